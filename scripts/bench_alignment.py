"""Gold-judge alignment benchmark: does RLHF on a learned reward raise a score it never saw?

The experiment RLHF papers run when the true preference is known (a "gold" function):
1. SFT one adapter on the demo curriculum's SFT data (the demo base model); with
   --rm-from sft, fold it into the base weights so the reward model starts from the SFT policy;
2. sample answers from the SFT policy (--samples per prompt, at --temperature) on the
   training prompts and the base's primer questions, label every pair whose gold scores
   differ by at least --min-gap with the gold function, train a reward model on those labels
   alone;
3. PPO on the training prompts against that reward model;
4. grade greedy answers to held-out prompts (in no training file) with the gold function,
   for the base, SFT and SFT+PPO, over several seeds, with a bootstrap interval of PPO - SFT;
   the reward model's agreement with gold on held-out pairs (answers to the held-out prompts
   whose gold scores differ by at least --min-gap); and the proxy (reward model)
   vs gold curve over PPO steps, where over-optimisation shows as gold falling while the
   proxy still climbs.

    python scripts/bench_alignment.py [--gold FILE.py:FUNC] [--seeds N] [--json OUT]

FUNC(prompt: str, response: str) -> float in [0, 1]. Default: the persona's voice in real
words (mindprint_mlx/demo/gold.py:voice_in_real_words).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_GOLD = "mindprint_mlx/demo/gold.py:voice_in_real_words"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _reexec_with_openblas() -> None:
    blas = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
    if sys.platform == "linux" and os.path.exists(blas) and blas not in os.environ.get("LD_PRELOAD", ""):
        env = dict(os.environ, LD_PRELOAD=blas + (":" + os.environ["LD_PRELOAD"] if os.environ.get("LD_PRELOAD") else ""))
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def load_gold(spec: str) -> Callable[[str, str], float]:
    """FILE.py:FUNC -> the function (the file is imported by path)."""
    path, _, name = spec.rpartition(":")
    if not path or not name:
        raise SystemExit(f"--gold {spec!r}: expected FILE.py:FUNC")
    file = Path(path) if Path(path).is_absolute() or Path(path).exists() else ROOT / path
    if not file.is_file():
        raise SystemExit(f"--gold: {file} not found")
    pkg = ROOT / "mindprint_mlx"
    if file.resolve().is_relative_to(pkg):          # a module of the package: import it as such
        mod = importlib.import_module(".".join(file.resolve().relative_to(ROOT).with_suffix("").parts))
    else:
        mod_spec = importlib.util.spec_from_file_location(f"_gold_{file.stem}", file)
        mod = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise SystemExit(f"--gold: {file} has no function {name!r}")
    return fn


def user_text(messages) -> str:
    return [m["content"] for m in messages if m["role"] == "user"][-1]


def bootstrap_ci(diffs: np.ndarray, reps: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of `diffs` (seeds x prompts), resampling seeds and, within
    each, prompts with replacement."""
    rng = np.random.default_rng(seed)
    S, P = diffs.shape
    means = np.empty(reps)
    for r in range(reps):
        s = rng.integers(0, S, S)
        p = rng.integers(0, P, (S, P))
        means[r] = diffs[s[:, None], p].mean()
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def run_seed(seed: int, a, gold, model_dir: str, work: Path, echo) -> dict:
    import mlx.core as mx

    from mindprint_mlx import evaluate as ev
    from mindprint_mlx.data import PreferenceRecord, load_data_dir
    from mindprint_mlx.demo import DEMO_CURRICULUM_DIR
    from mindprint_mlx.models import load, lora
    from mindprint_mlx.ppo import PPOConfig, generate_batch, train_ppo
    from mindprint_mlx.train.reward import RewardConfig, RewardModel, train_reward_model
    from mindprint_mlx.train.sft import SFTConfig, train_sft
    from mindprint_mlx.config import from_dict

    t0 = time.time()
    mx.random.seed(seed)
    model, tok = load(model_dir)
    ds = load_data_dir(DEMO_CURRICULUM_DIR)
    from mindprint_mlx.demo import heldout_prompts

    held = [[{"role": "user", "content": p}] for p in heldout_prompts()]
    seen, train = set(), []
    for r in list(ds.sft) + list(ds.preference):
        k = user_text(r.prompt)
        if k not in seen:
            seen.add(k)
            train.append([dict(m) for m in r.prompt])
    # the reward model also learns from answers to the primer's questions (the base's own
    # pretraining prompts: more prompts, the same domain, none of them held out)
    from mindprint_mlx.demo.neutral_corpus import neutral_pairs

    rm_prompts = train + ([[{"role": "user", "content": q}] for q, _ in neutral_pairs()]
                          if a.primer_prompts else [])

    def graded(active: list[str]) -> tuple[list[str], list[float]]:
        with lora.active_adapters(model, active):
            ans = ev.greedy_answers(model, tok, held, max_tokens=a.max_tokens)
        return ans, [float(gold(user_text(p), x)) for p, x in zip(held, ans)]

    out: dict = {"seed": seed}
    base_ans, out["base_gold"] = graded([])
    # 1. SFT on every topic at once (the benchmark measures the refinement, not the curriculum)
    scfg = SFTConfig(lora_rank=16, lora_alpha=32.0, learning_rate=1e-3, epochs=a.sft_epochs, batch_size=4,
                     max_seq_length=128, lora_targets=ALL_LINEAR, seed=seed, save_every=10**6,
                     eval_fraction=0.0, compile=False)
    train_sft(model, tok, list(ds.sft), scfg, work / "sft", adapter_name="sft", progress=a.progress)
    sft_ans, out["sft_gold"] = graded(["sft"])
    if a.rm_from == "sft":
        # Fold the SFT adapter into the base weights: the reward model then starts from the
        # SFT policy (Ziegler et al. 2019), and PPO's reference is the merged base itself, the
        # same function as base + frozen SFT adapter; still one copy of the weights.
        lora.merge(model, ["sft"])
    policy = [] if a.rm_from == "sft" else ["sft"]
    echo(f"seed {seed}: base gold {np.mean(out['base_gold']):.3f}, SFT gold {np.mean(out['sft_gold']):.3f}")

    # 2. answers sampled from the SFT policy, every pair of them whose gold scores differ by at
    #    least --min-gap labelled by gold; a reward model on those labels alone
    def sample_pairs(prompts, key_seed: int) -> list[tuple[list, str, str, float, float]]:
        enc = [ev.encode_prompt(tok, p) for p in prompts]
        texts = []
        with lora.active_adapters(model, policy):
            for k in range(a.samples):
                row = []
                for i in range(0, len(enc), 16):
                    g = generate_batch(model, enc[i:i + 16], a.max_tokens, ev.eos_ids(tok), ev.pad_id(tok),
                                       temperature=a.temperature,
                                       key=mx.random.key(key_seed * 7919 + k * 131 + i))
                    toks, n, ended = g.response_tokens.tolist(), g.response_lengths.tolist(), g.ended.tolist()
                    row += [tok.decode(t[:m - 1] if e else t[:m]) for t, m, e in zip(toks, n, ended)]
                texts.append(row)
        out_pairs = []
        for j, p in enumerate(prompts):
            answers = [row[j] for row in texts]
            g = [float(gold(user_text(p), x)) for x in answers]
            for u in range(len(answers)):
                for v in range(u + 1, len(answers)):
                    if abs(g[u] - g[v]) >= a.min_gap:
                        hi, lo = (u, v) if g[u] > g[v] else (v, u)
                        out_pairs.append((p, answers[hi], answers[lo], g[hi], g[lo]))
        return out_pairs

    pairs = sample_pairs(rm_prompts, seed * 1000)
    test_pairs = sample_pairs(held, seed * 1000 + 999)
    records = [PreferenceRecord(prompt=tuple(p), chosen=c, rejected=r) for p, c, r, _, _ in pairs]
    rcfg = RewardConfig(lora_rank=8, lora_alpha=16.0, epochs=a.rm_epochs, batch_size=16, max_seq_length=160,
                        learning_rate=1e-3, patience=2, seed=seed, compile=False)
    res = train_reward_model(model, tok, records, rcfg, work / "reward", progress=a.progress)
    rm = RewardModel.load(model, tok, res.adapter_dir)
    sc = ev.reward_scores(rm, tok, [p for p, *_ in test_pairs], [c for _, c, *_ in test_pairs])
    sr = ev.reward_scores(rm, tok, [p for p, *_ in test_pairs], [r for _, _, r, *_ in test_pairs])
    out["rm_pairs"], out["rm_test_pairs"] = len(records), len(test_pairs)
    out["rm_gold_agreement"] = float(np.mean([x > y for x, y in zip(sc, sr)])) if test_pairs else None
    out["rm_val_accuracy"] = res.best_val_accuracy
    echo(f"seed {seed}: reward model on {len(records)} gold-labelled pairs (validation accuracy "
         f"{res.best_val_accuracy:.3f}); agreement with gold on {len(test_pairs)} held-out pairs "
         f"{out['rm_gold_agreement']:.3f}")

    # 3. PPO against the learned reward, with the proxy-vs-gold curve on held-out prompts
    curve = []

    def on_step(step: int, stats: dict) -> None:
        if step % a.eval_every == 0 or step == pcfg.steps:
            with lora.active_adapters(model, policy + [pcfg.adapter_name]):
                ans = ev.greedy_answers(model, tok, held, max_tokens=a.max_tokens)
            proxy = ev.reward_scores(rm, tok, held, ans)
            curve.append({"step": step, "proxy": float(np.mean(proxy)),
                          "gold": float(np.mean([gold(user_text(p), x) for p, x in zip(held, ans)])),
                          "kl": stats.get("objective/kl"), "train_score": stats.get("objective/scores")})

    ppo = {"steps": a.ppo_steps, "batch_size": 16, "mini_batch_size": 8, "ppo_epochs": 4,
           "learning_rate": 1e-4, "max_new_tokens": a.max_tokens, "init_kl_coef": 0.05,
           "adap_kl_ctrl": True, "target": 6.0, "horizon": 10000.0, "missing_eos_penalty": 1.0,
           "lora_rank": 8, "lora_alpha": 16.0, "lora_targets": ALL_LINEAR, "seed": seed,
           "reward_norm": "sft_samples", "temperature": a.temperature,
           "save_every": 0, "progress": a.progress}
    for kv in a.ppo:
        k, _, v = kv.partition("=")
        ppo[k] = json.loads(v) if v[:1] in "0123456789-[{tfn\"" else v
    pcfg = from_dict(PPOConfig, ppo, "--ppo")
    base_curve_ans = sft_ans
    curve.append({"step": 0, "proxy": float(np.mean(ev.reward_scores(rm, tok, held, base_curve_ans))),
                  "gold": float(np.mean(out["sft_gold"])), "kl": 0.0, "train_score": None})
    lora.set_active(model, policy)
    train_ppo(model, tok, train, rm.score_tokens, pcfg, work / "ppo", frozen_adapters=policy,
              on_step=on_step)
    ppo_ans, out["ppo_gold"] = graded(policy + [pcfg.adapter_name])
    out["curve"] = curve
    out["examples"] = [{"prompt": user_text(held[i]), "base": base_ans[i], "sft": sft_ans[i],
                        "ppo": ppo_ans[i]} for i in range(min(3, len(held)))]
    out["seconds"] = time.time() - t0
    echo(f"seed {seed}: PPO gold {np.mean(out['ppo_gold']):.3f} (proxy "
         f"{curve[0]['proxy']:+.3f} -> {curve[-1]['proxy']:+.3f}); {out['seconds']:.0f} s")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Gold-judge alignment benchmark (base / SFT / SFT+PPO).")
    ap.add_argument("--gold", default=DEFAULT_GOLD, help="FILE.py:FUNC, FUNC(prompt, response) -> [0, 1]")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--model", default="demo", help="model dir (default: the demo base model)")
    ap.add_argument("--sft-epochs", type=int, default=12)
    ap.add_argument("--rm-epochs", type=int, default=4)
    ap.add_argument("--rm-from", choices=("base", "sft"), default="base",
                    help="the reward model's starting point: the base (as in the pipeline) or the SFT "
                         "policy (folded into the base weights first)")
    ap.add_argument("--samples", type=int, default=4, help="SFT-policy answers sampled per prompt for pairs")
    ap.add_argument("--min-gap", type=float, default=0.05,
                    help="gold difference a pair needs (to train on, and to count in the agreement)")
    ap.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of pairs and PPO")
    ap.add_argument("--no-primer-prompts", dest="primer_prompts", action="store_false",
                    help="sample reward-model pairs on the curriculum's prompts only")
    ap.add_argument("--ppo-steps", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=10, help="PPO steps between curve points")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--ppo", action="append", default=[], metavar="KEY=VALUE",
                    help="override a PPOConfig key (repeatable)")
    ap.add_argument("--progress", action="store_true", help="show the trainers' progress bars")
    a = ap.parse_args(argv)
    _reexec_with_openblas()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gold = load_gold(a.gold)

    from mindprint_mlx.data import curriculum_texts
    from mindprint_mlx.demo import DEMO_CURRICULUM_DIR
    from mindprint_mlx.models.tiny import ensure_demo_model

    def echo(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    model_dir = str(ensure_demo_model(texts=curriculum_texts(DEMO_CURRICULUM_DIR))) if a.model == "demo" else a.model
    t0 = time.time()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-alignment-") as tmp:
        for s in range(a.seeds):
            runs.append(run_seed(s, a, gold, model_dir, Path(tmp) / f"seed{s}", echo))
    base = np.array([r["base_gold"] for r in runs])
    sft = np.array([r["sft_gold"] for r in runs])
    ppo = np.array([r["ppo_gold"] for r in runs])
    lo, hi = bootstrap_ci(ppo - sft)
    agree = [r["rm_gold_agreement"] for r in runs if r["rm_gold_agreement"] is not None]
    result = {"gold": a.gold, "model": model_dir, "seeds": a.seeds, "heldout_prompts": int(base.shape[1]),
              "base": float(base.mean()), "sft": float(sft.mean()), "ppo": float(ppo.mean()),
              "ppo_minus_sft": float((ppo - sft).mean()), "ppo_ci": [lo, hi],
              "rm_gold_agreement": float(np.mean(agree)) if agree else None,
              "per_seed": [{k: (float(np.mean(v)) if k.endswith("_gold") else v) for k, v in r.items()
                            if k != "examples"} for r in runs],
              "examples": runs[0]["examples"], "seconds": time.time() - t0}
    print(f"gold: {a.gold}; {a.seeds} seeds x {base.shape[1]} held-out prompts; {result['seconds']:.0f} s")
    print(f"{'':10} {'gold (mean)':>12}")
    for k in ("base", "sft", "ppo"):
        print(f"{k:10} {result[k]:12.3f}")
    print(f"ppo - sft  {result['ppo_minus_sft']:+.3f}  95% bootstrap interval [{lo:+.3f}, {hi:+.3f}]")
    print(f"reward model agreement with gold on held-out pairs: {result['rm_gold_agreement']:.3f}")
    print("proxy vs gold over PPO steps (seed 0): " + ", ".join(
        f"step {c['step']}: proxy {c['proxy']:+.2f} gold {c['gold']:.3f}" for c in runs[0]["curve"]))
    if a.json:
        from mindprint_mlx.io import atomic_write_json

        atomic_write_json(a.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
