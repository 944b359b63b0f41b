"""Re-run one topic's PPO phase of a finished pipeline run, over trainer seeds and settings.

Does a PPO setting climb the reward on a topic, or did one run's trend come by chance? This
loads what the run's PPO phase of TOPIC started from (the base, the frozen unit adapters
below the topic, its SFT adapter and the run's reward model, all from RUN_DIR), runs PPO
with the run's `ppo:` settings and any --set overrides once per seed, and prints the
training-batch trend the pipeline prints (the mean score of the first 3 steps against the
last 3) in raw and in normalised units (x the reward normalisation's gain: SFT-policy
samples have std 1 there), the KL to the SFT policy and the value head's explained
variance. Nothing in RUN_DIR changes.

    python scripts/ppo_phase.py RUN_DIR TOPIC [--seeds 1,2] [--set KEY=VALUE ...]

TOPIC: a topic key, directory or name (a unique part of one will do). --seeds: PPO's own
seeds (default: the one the run's phase used, which repeats it). --set: a `ppo:` key, e.g.
--set learning_rate=5e-4 --set batch_size=32.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def pick_topic(keys: list[str], wanted: str) -> str:
    """The run's topic key `wanted` names: itself, or the only key containing it."""
    if wanted in keys:
        return wanted
    hits = [k for k in keys if wanted in k]
    if len(hits) != 1:
        what = "no topic" if not hits else f"{len(hits)} topics ({', '.join(hits)})"
        raise SystemExit(f"TOPIC {wanted!r}: {what} of the run match; topics: {', '.join(keys)}")
    return hits[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("topic")
    ap.add_argument("--seeds", default=None, help="comma-separated PPO seeds (default: the run's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a ppo: key (repeatable)")
    a = ap.parse_args(argv)
    state_file, run_file = a.run_dir / "state.json", a.run_dir / "run.json"
    for f in (state_file, run_file):
        if not f.is_file():
            raise SystemExit(f"{f}: not found (RUN_DIR is a pipeline run's directory)")
    state = json.loads(state_file.read_text())
    key = pick_topic(list(state.get("topics", {})), a.topic)
    sft_rec = state["topics"][key].get("phases", {}).get("sft") or {}
    if not sft_rec.get("done"):
        raise SystemExit(f"{state_file}: topic {key!r} has no finished SFT phase")
    for kv in a.set:
        if "=" not in kv:
            raise SystemExit(f"--set {kv!r}: expected KEY=VALUE")
    try:
        seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else None
    except ValueError:
        raise SystemExit(f"--seeds {a.seeds!r}: expected comma-separated integers") from None

    spec = importlib.util.spec_from_file_location("bench_alignment", HERE / "bench_alignment.py")
    ba = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ba)
    ba._reexec_with_openblas()                  # 13x faster steps on Linux

    from mindprint_mlx.data import build_curriculum, load_data_dir
    from mindprint_mlx.errors import MindprintError
    from mindprint_mlx.models import load, lora
    from mindprint_mlx.models.adapters import load_adapter
    from mindprint_mlx.pipeline.config import load_pipeline_config
    from mindprint_mlx.pipeline.decide import score_trend
    from mindprint_mlx.pipeline.phases import ppo_prompts
    from mindprint_mlx.pipeline.refine import section
    from mindprint_mlx.ppo import train_ppo
    from mindprint_mlx.train.reward import RewardModel

    try:
        cfg = load_pipeline_config(None, [f"ppo.{kv}" for kv in a.set],
                                   base=json.loads(run_file.read_text())["config"])
    except MindprintError as e:
        raise SystemExit(f"--set: {e}") from None
    if cfg.merge.mode == "fold_into_base":
        raise SystemExit(f"{run_file}: merge.mode fold_into_base: only runs that keep their units "
                         "as adapters (concat, svd) can be re-run here")
    pcfg = section(cfg, "ppo")
    seeds = seeds if seeds is not None else [pcfg.seed]
    sft_dir = a.run_dir / sft_rec["adapter"]
    meta = json.loads((sft_dir / "mindprint.json").read_text())
    model, tok = load(cfg.model)
    units, active = list(state.get("units", {})), []
    for name in meta.get("frozen_below", []):      # the merged units below, named u0, u1, ...
        i = int(name[1:]) if name[:1] == "u" and name[1:].isdigit() else -1
        if not 0 <= i < len(units) or not state["units"][units[i]].get("merged"):
            raise SystemExit(f"{sft_dir / 'mindprint.json'}: frozen adapter {name!r} is no merged "
                             f"unit of {state_file}")
        load_adapter(model, a.run_dir / state["units"][units[i]]["merged"], name=name)
        active.append(name)
    load_adapter(model, sft_dir, name="sft")
    active.append("sft")
    rm = RewardModel.load(model, tok, a.run_dir / state["reward_model"]["adapter_dir"])
    topic = build_curriculum(load_data_dir(cfg.data_dir)).topic(key)
    prompts = ppo_prompts(topic)
    print(f"{key}: PPO on {len(prompts)} prompts, {pcfg.steps} steps of {pcfg.batch_size} rollouts"
          + (f" ({', '.join(a.set)})" if a.set else ""), flush=True)
    rows = []
    for seed in seeds:
        run_cfg = dataclasses.replace(pcfg, seed=seed, progress=False, save_every=0)
        lora.set_active(model, active)
        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix="ppo-phase-") as work:
            res = train_ppo(model, tok, prompts, rm.score_tokens, run_cfg, Path(work),
                            frozen_adapters=active, resume=False)
        lora.remove_adapter(model, run_cfg.adapter_name)
        trend = score_trend(res.history)
        gain = res.reward_gain
        d = (trend["last"] - trend["first"]) * gain
        ev = float(np.mean([h.get("ppo/val/explained_variance", np.nan) for h in res.history]))
        rows.append((d, trend["rises"]))
        print(f"seed {seed}: training batches {trend['first']:+.3f} -> {trend['last']:+.3f} "
              f"({'rises' if trend['rises'] else 'does not rise'}; {d:+.2f} in normalised units); "
              f"KL to SFT {res.history[-1]['objective/kl']:.2f} nats; value explained variance "
              f"{ev:+.2f}; {time.time() - t0:.0f} s", flush=True)
    ds = np.array([r[0] for r in rows])
    print(f"rises in {sum(bool(r[1]) for r in rows)} of {len(rows)}; normalised change mean "
          f"{ds.mean():+.3f}" + (f", std {ds.std(ddof=1):.3f}" if len(ds) > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
