#!/usr/bin/env python
"""Benchmark PPO: rollout tokens/s against mlx-lm's own batch generation, a PPO step's time
split (generation / teacher forcing / scoring / update) and peak memory over base weight bytes.

    python scripts/bench_ppo.py                      # builds the baseline tiny llama (3.3M)
    python scripts/bench_ppo.py --model PATH --quantize 4 --batch 8 --new-tokens 64

On Linux preload OpenBLAS first (see scripts/test.sh), as the CLI does.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

PROMPTS = ["Tell me about the river.", "Why does the teacher read?", "Describe a small boat.",
           "What is patience?", "Write a letter to a friend.", "Explain the old clock.",
           "What did the farmer find?", "Say something about rain."]


def build_model(out: Path) -> Path:
    from mindprint_mlx.models.tiny import build_tiny_model

    # The baseline benchmark model: a 3.3M llama, 4 layers, 256 wide.
    return build_tiny_model(out, arch="llama", hidden_size=256, num_layers=4, num_heads=4,
                            num_kv_heads=2, intermediate_size=512, vocab_size=2048, seed=0)


def bench_rollout(model, tok, prompts, new_tokens, repeats):
    """Both generate exactly len(prompts) x new_tokens tokens (no stop token), so tokens/s
    compares the generation loops, not how early random samples happen to end."""
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler

    from mindprint_mlx.ppo.rollout import generate_batch

    def ours(i):
        t = time.perf_counter()
        g = generate_batch(model, prompts, new_tokens, [], tok.pad_token_id, 1.0, 1.0,
                           key=mx.random.key(i))
        return int(np.array(g.response_lengths).sum()), time.perf_counter() - t

    sampler = make_sampler(temp=1.0)

    def theirs(i):
        # mlx_lm.generate.batch_generate's loop, with no stop tokens.
        mx.random.seed(i)
        t = time.perf_counter()
        gen = BatchGenerator(model, stop_tokens=[], sampler=sampler)
        gen.insert(prompts, [new_tokens] * len(prompts))
        n = 0
        while responses := gen.next_generated():
            n += len(responses)
        gen.close()
        return n, time.perf_counter() - t

    ours(100), theirs(100)                                   # warm up
    a, b = [], []
    for i in range(repeats):              # interleaved, so a load change hits both alike
        a.append(ours(i))
        b.append(theirs(i))
    tps = lambda runs: statistics.median(n / s for n, s in runs)
    return {"rollout_tokens_per_sec": tps(a), "mlx_lm_batch_generate_tokens_per_sec": tps(b),
            "ratio": tps(a) / tps(b), "rollout_tokens": a[0][0], "mlx_lm_tokens": b[0][0]}


def bench_step(model, tok, prompts, new_tokens, steps, tmp: Path):
    from mindprint_mlx.models import lora
    from mindprint_mlx.models.adapters import save_adapter
    from mindprint_mlx.models.heads import ScalarHead, hidden_size
    from mindprint_mlx.ppo import PPOConfig, PPOTrainer, base_weight_bytes
    from mindprint_mlx.train.reward import RewardModel

    # The four roles on one base: sft (frozen), ppo (trainable) + value head, reward adapter + head.
    lora.apply_lora(model, "sft", trainable=False)
    lora.apply_lora(model, "reward_src", trainable=False, enabled=False)
    save_adapter(model, "reward_src", tmp / "rm", heads={"reward": ScalarHead(hidden_size(model), zero_init=False)})
    lora.remove_adapter(model, "reward_src")
    rm = RewardModel.load(model, tok, tmp / "rm")
    cfg = PPOConfig(batch_size=len(prompts), mini_batch_size=max(1, len(prompts) // 2),
                    max_new_tokens=new_tokens, progress=False)
    trainer = PPOTrainer(model, tok, rm.score_tokens, cfg, frozen_adapters=["sft"])
    mx.reset_peak_memory()
    rows = [trainer.train_step(prompts) for _ in range(steps + 1)][1:]   # first step warms up
    mean = lambda k: statistics.mean(r[k] for r in rows)
    return {
        "step_seconds": mean("ppo/time/step"),
        "generation_seconds": mean("ppo/time/generation"),
        "teacher_forcing_seconds": mean("ppo/time/forward"),
        "scoring_seconds": mean("ppo/time/scoring"),
        "update_seconds": mean("ppo/time/update"),
        "step_tokens_per_sec": mean("ppo/tokens_per_sec"),
        "peak_memory_bytes": int(mx.get_peak_memory()),
        "base_weight_bytes": base_weight_bytes(model),
        "peak_over_base": mx.get_peak_memory() / base_weight_bytes(model),
        "minibatches_per_step": rows[-1]["ppo/minibatches"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory or hub id (default: build the tiny baseline)")
    ap.add_argument("--quantize", type=int, choices=[4, 8], default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    from mindprint_mlx.data.batching import encode_prompt
    from mindprint_mlx.models import load

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        path = args.model or build_model(tmp / "model")
        model, tok = load(path, quantize=args.quantize)
        texts = (PROMPTS * (args.batch // len(PROMPTS) + 1))[: args.batch]
        prompts = [encode_prompt(tok, t) for t in texts]
        res = {"model": str(args.model or "tiny llama 4x256 (built)"), "quantize": args.quantize,
               "batch": args.batch, "new_tokens": args.new_tokens,
               "device": str(mx.default_device())}
        res.update(bench_rollout(model, tok, prompts, args.new_tokens, args.repeats))
        res.update(bench_step(model, tok, prompts, args.new_tokens, args.steps, tmp))
    for k, v in res.items():
        print(f"{k:40s} {v:.4g}" if isinstance(v, float) else f"{k:40s} {v}")
    if args.json:
        from mindprint_mlx.io import atomic_write_json
        atomic_write_json(args.json, res)


if __name__ == "__main__":
    main()
