"""Does a run's reward model rank its policy's own answers as a gold judge does?

A reward model's validation accuracy is measured on pairs like those it trained on (the
person's answers against the base model's); PPO asks something else of it: to order the
answers the policy samples, on prompts it never saw. This measures that, from outside the
run: for a pipeline run (or `mindprint demo`'s), sample --samples answers a prompt from its
final adapter (loaded as a user would) at --temperature on held-out prompts (default: the
demo's 28, in no data file, with the sampling keys of `mindprint demo`'s held-out scores),
grade them with a gold function, and for every pair of a prompt's answers whose gold scores
differ by at least --min-gap, count how often each scorer prefers the gold's choice:

- the run's reward model (what PPO climbs) and its judge (the quiz's preference part);
- two scorers that know nothing of the preference, as a floor: the policy's own mean
  log-likelihood of the answer, and the answer's length in tokens.

A reward model that does no better than the policy's own likelihood gives PPO little to
climb beyond sharpening the policy towards its own typical answers. Agreement 0.5 is chance; the gold-judge benchmark
(scripts/bench_alignment.py) shows PPO raising gold on held-out prompts at about 0.75.

    python scripts/rm_agreement.py RUN [--gold FILE.py:FUNC] [--prompts FILE.jsonl]
        [--samples 8] [--temperature 0.7] [--max-tokens 64] [--min-gap 0.05] [--json OUT]

FUNC(prompt: str, response: str) -> float in [0, 1] (default: the persona's voice in real
words, mindprint_mlx/demo/gold.py:voice_in_real_words). --prompts: one JSON object a line
with a "prompt" string.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_PROMPTS = HERE.parent / "mindprint_mlx" / "demo" / "heldout_prompts.jsonl"


def _script(name: str):
    """Another script here as a module: bench_alignment (the gold loader), heldout_voice
    (a run's final adapter loaded as a user would)."""
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise SystemExit(f"--prompts: {path} not found")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            p = json.loads(line)["prompt"]
        except (ValueError, KeyError, TypeError):
            raise SystemExit(f"{path}:{n}: expected a JSON object with a \"prompt\" string") from None
        if not isinstance(p, str) or not p.strip():
            raise SystemExit(f"{path}:{n}: \"prompt\" must be a non-empty string")
        out.append(p)
    if not out:
        raise SystemExit(f"{path}: no prompts")
    return out


def run_scorer(model, tok, run_dir: Path, key: str, name: str):
    """The run's reward model or judge (state.json `key`), or None if it has none."""
    from mindprint_mlx.train.reward import RewardModel

    state = json.loads((run_dir / "state.json").read_text())
    rec = state.get(key) or {}
    if not rec.get("adapter_dir"):
        return None
    d = Path(rec["adapter_dir"])
    return RewardModel.load(model, tok, d if d.is_absolute() else run_dir / d, name=name)


def main(argv=None) -> int:
    ba = _script("bench_alignment")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a pipeline run directory (finished)")
    ap.add_argument("--gold", default=ba.DEFAULT_GOLD, help="FILE.py:FUNC")
    ap.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    ap.add_argument("--samples", type=int, default=8, help="answers sampled a prompt (>= 2)")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--min-gap", type=float, default=0.05,
                    help="gold difference a pair needs to count")
    ap.add_argument("--seed", type=int, default=4242, help="sampling keys")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.samples < 2 or not a.temperature > 0 or a.max_tokens < 1 or a.min_gap < 0:
        ap.error("--samples >= 2, --temperature > 0, --max-tokens >= 1 and --min-gap >= 0")
    gold = ba.load_gold(a.gold)
    prompts = read_prompts(a.prompts)
    run = a.run
    if (run / "run.json").is_file() and not (run / "state.json").is_file():
        raise SystemExit(f"{run}: not a pipeline run directory (no state.json)")

    import mlx.core as mx
    import numpy as np

    from mindprint_mlx import evaluate as ev
    from mindprint_mlx.models import load, lora

    bases: dict = {}
    pmodel, ptok, shipped = _script("heldout_voice").load_final(run, bases)  # as a user loads it
    # the reward model and judge sit on the model the run trained on (another base when the
    # run folded its units into one)
    trained_on = json.loads((run / "run.json").read_text())["config"]["model"]
    smodel, stok = bases[trained_on] if trained_on in bases else load(trained_on)
    msgs = [[{"role": "user", "content": p}] for p in prompts]
    scorers = {name: sc for key, name in (("reward_model", "reward_model"), ("judge_model", "judge"))
               if (sc := run_scorer(smodel, stok, run, key, name)) is not None}
    with lora.active_adapters(pmodel, [shipped]):
        rows = [ev.sampled_answers(pmodel, ptok, msgs, a.max_tokens, a.temperature,
                                   key_of=lambda i, k=k: mx.random.key(a.seed + k * 131 + i))
                for k in range(a.samples)]
        answers = [[row[i] for row in rows] for i in range(len(prompts))]
        grades = [[float(gold(p, x)) for x in xs] for p, xs in zip(prompts, answers)]
        agreement, pairs = ev.scorer_agreement(pmodel, ptok, msgs, answers, grades, scorers,
                                               a.min_gap)
    out = {"run": str(run), "gold": a.gold, "prompts": len(prompts), "samples": a.samples,
           "temperature": a.temperature, "min_gap": a.min_gap, "pairs": pairs,
           "gold_mean": float(np.mean(grades)), "agreement": agreement}
    print(f"{run}: {a.samples} answers a prompt to {len(prompts)} prompts at temperature "
          f"{a.temperature}, mean gold {out['gold_mean']:.3f}; {pairs} pairs whose gold "
          f"differs by >= {a.min_gap}")
    print("agreement with gold (0.5 = chance):")
    for k, v in out["agreement"].items():
        print(f"  {k:14} {'-' if v is None else f'{v:.3f}'}")
    if a.json:
        from mindprint_mlx.io import atomic_write_json

        atomic_write_json(a.json, out)
    return 0


if __name__ == "__main__":
    _script("bench_alignment")._reexec_with_openblas()      # 13x faster steps on Linux, as the benchmark
    sys.exit(main())
