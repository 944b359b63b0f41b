"""A few steps of DPO, DITTO, GRPO and RLOO on a random tiny model: the loss falls or the
reward rises, and peak memory stays a small multiple of the base weights (one base in
memory; a second copy of the base alone would double it).

    python scripts/align_methods_smoke.py [--out /tmp/align-smoke]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mindprint_mlx.grpo import GRPOConfig, train_grpo
from mindprint_mlx.models import load, lora
from mindprint_mlx.models.tiny import build_tiny_model
from mindprint_mlx.preference import DITTOConfig, DPOConfig, train_ditto, train_dpo
from mindprint_mlx.train.policy_adapter import base_weight_bytes

TEXTS = ["hi there", "the teacher reads", "why does it rain", "a small boat", "tell me a story",
         "the old clock", "my friend writes a letter", "near the river"]
ANSWER = "the river is near the old clock and the teacher reads"


def fresh(path):
    model, tok = load(str(path))
    mx.random.seed(0)
    lora.apply_lora(model, "sft", r=2, alpha=4.0, trainable=False)
    for _, m in lora.lora_layers(model):
        m.adapters["sft"].lora_b = 0.2 * mx.random.normal(m.adapters["sft"].lora_b.shape)
    return model, tok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/align-smoke")
    args = ap.parse_args()
    out = Path(args.out)
    path = out / "model"
    if not (path / "config.json").exists():
        build_tiny_model(path, arch="llama", seed=0, texts=TEXTS + [ANSWER], vocab_size=1024,
                         hidden_size=256, num_layers=4, intermediate_size=512)
    rows = []

    def report(name, first, last, what, hist, key, t):
        h = hist[-1]
        rows.append({"method": name, what + "_first": round(first, 4), what + "_last": round(last, 4),
                     "steps": len(hist), "peak_MiB": round(h[key + "/memory/peak_bytes"] / 2**20, 2),
                     "base_MiB": round(h[key + "/memory/base_weight_bytes"] / 2**20, 2),
                     "peak_over_base": round(h[key + "/memory/peak_over_base"], 2),
                     "seconds": round(t, 1)})
        print(json.dumps(rows[-1]), flush=True)

    common = dict(learning_rate=5e-3, progress=False, save_every=0, seed=0)
    model, tok = fresh(path)
    t = time.time()
    pairs = [(p, ANSWER, "no idea") for p in TEXTS]
    r = train_dpo(model, tok, pairs, DPOConfig(steps=8, batch_size=4, **common), out / "dpo", ["sft"])
    report("dpo", r.loss_first, r.loss_last, "loss", r.history, "dpo", time.time() - t)

    model, tok = fresh(path)
    t = time.time()
    r = train_ditto(model, tok, [(p, ANSWER) for p in TEXTS],
                    DITTOConfig(rounds=2, steps=4, batch_size=4, max_new_tokens=12, **common),
                    out / "ditto", ["sft"])
    report("ditto", r.loss_first, r.loss_last, "loss", r.history, "ditto", time.time() - t)

    for method in ("grpo", "rloo"):
        model, tok = fresh(path)
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
                   for p in TEXTS]

        def reward_fn(tokens, lengths):       # share of even token ids in the response
            s = []
            for row, n in zip(np.array(tokens), np.array(lengths)):
                start = next(len(p) for p in prompts if list(row[:len(p)]) == list(p))
                s.append(float((row[start:n] % 2 == 0).mean()) if n > start else 0.0)
            return mx.array(s)
        t = time.time()
        cfg = GRPOConfig(method=method, steps=12, batch_size=4, group_size=4, max_new_tokens=8,
                         num_iterations=2, **{**common, "learning_rate": 1e-2})
        r = train_grpo(model, tok, TEXTS, reward_fn, cfg, out / method, ["sft"])
        sc = [h["objective/scores"] for h in r.history]
        report(method, float(np.mean(sc[:3])), float(np.mean(sc[-3:])), "score(mean of 3)",
               r.history, method, time.time() - t)
    print(f"base weights: {base_weight_bytes(model) / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
