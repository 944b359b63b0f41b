#!/usr/bin/env python
"""PPO steps side by side: mindprint (MLX) against TRL 0.11.4's classic PPOTrainer + peft (PyTorch CPU).

    python scripts/bench_ppo_vs_trl.py                     # batches 4, 8, 16, 3 rounds
    python scripts/bench_ppo_vs_trl.py --batches 8 --steps 5 --rounds 1 --json out.json
    python scripts/bench_ppo_vs_trl.py --model PATH        # any HF llama-style directory

Builds one Hugging Face model directory (bench.py's `tiny` llama: 4 layers x 256 wide,
vocab 2048, fp32) and runs both trainers on it with the same settings: the same token
prompts, LoRA of the same rank and targets (o/v/up/down, r=1, alpha=1), one minibatch
of the whole batch, 4 PPO epochs, exactly `--new-tokens` response tokens per row (TRL:
min_new_tokens = max_new_tokens; mindprint: no stop token), sampling at T=1, the same cheap
score (share of even token ids), `--threads` BLAS/OpenMP threads (default 2; OpenMP
threads wait passively, see OMP_NOTE), each side in a fresh process. The reference is the
base with the adapter switched off on both sides. Prints response tokens/s (response tokens
of a step / the step's wall time, generation included) of each, their ratio, and each
side's time split.

The TRL side runs as a subprocess (scripts/_trl_ppo_runner.py) in a virtualenv of its own,
created on first use under ~/.cache/mindprint/trl-venv (or --trl-venv DIR, or
$MINDPRINT_TRL_VENV) with torch 2.13.0 (from PyTorch's CPU wheel index where it can be
reached, else from the configured index), transformers 4.46.3, trl 0.11.4 and peft 0.13.2;
none of them is a dependency of this project. Not part of the test suite. On Linux,
preload OpenBLAS for MLX (scripts/test.sh). On a machine shared with other work, read the
ratios: both sides run back to back.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
PINS = {"torch": "2.13.0", "transformers": "4.46.3", "trl": "0.11.4", "peft": "0.13.2"}
EXTRA = ["rich"]          # trl 0.11.4 imports it without declaring it
TARGETS = ["o_proj", "v_proj", "up_proj", "down_proj"]
DEFAULT_VENV = Path.home() / ".cache" / "mindprint" / "trl-venv"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


# ---------------------------------------------------------------------- the TRL virtualenv

def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _venv_ok(py: Path) -> bool:
    if not py.exists():
        return False
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            f"{sorted(PINS) + EXTRA!r}}}))")
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        return False
    have = json.loads(r.stdout.strip().splitlines()[-1])
    return all(have.get(p, "").split("+")[0] == v for p, v in PINS.items())


def _reachable(url: str, timeout: float = 10.0) -> bool:
    """Whether `url` answers at all (one request, no retries)."""
    import urllib.error
    import urllib.request
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        return True
    except urllib.error.HTTPError:       # it answered
        return True
    except Exception:  # noqa: BLE001 - DNS, connection, TLS, timeout: pip could not reach it either
        return False


def ensure_venv(venv: Path) -> Path:
    """The TRL virtualenv's python; created (and the pinned packages installed) on first use."""
    py = _venv_python(venv)
    if _venv_ok(py):
        return py
    print(f"creating the TRL virtualenv in {venv} (torch {PINS['torch']} CPU, transformers "
          f"{PINS['transformers']}, trl {PINS['trl']}, peft {PINS['peft']}) ...", flush=True)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    torch_pin = f"torch=={PINS['torch']}"
    # PyTorch's CPU wheel index where it can be reached (no CUDA libraries); otherwise the
    # configured index (PyPI): on Linux x86-64 its torch wheel is the CUDA build, a larger
    # download that runs on the CPU all the same, elsewhere it is the CPU build.
    if _reachable(CPU_INDEX):
        r = subprocess.run(pip + ["--index-url", CPU_INDEX, torch_pin])
        ok = r.returncode == 0
    else:
        print(f"  {CPU_INDEX} cannot be reached: torch comes from the configured index", flush=True)
        ok = False
    if not ok:
        subprocess.run(pip + [torch_pin], check=True)
    subprocess.run(pip + [f"{p}=={v}" for p, v in PINS.items() if p != "torch"] + EXTRA, check=True)
    if not _venv_ok(py):
        raise SystemExit(f"{venv}: the pinned packages did not install ({PINS})")
    return py


# ---------------------------------------------------------------------- the two sides

# OMP_NOTE: PyTorch's OpenMP threads spin-wait at every parallel region by default. With
# more threads than idle cores (a machine shared with other jobs) a spinning thread waits
# for one that is descheduled, and TRL's step took 10-40x longer (2 threads, 2 cores, load
# 4: 4 tok/s instead of ~180 at batch 4). OMP_WAIT_POLICY=PASSIVE (set on both sides unless
# the environment sets it) makes waiting threads sleep; on an idle machine it costs little.

def run_trl(py: Path, spec: dict, tmp: Path) -> dict:
    path = tmp / f"spec-{time.time_ns()}.json"
    path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)           # MLX's OpenBLAS preload is not torch's business
    env.pop("PYTHONPATH", None)
    env.update(OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")    # see OMP_NOTE
    r = subprocess.run([str(py), str(HERE / "_trl_ppo_runner.py"), str(path)],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"the TRL runner failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_mindprint_subprocess(spec: dict, tmp: Path) -> dict:
    """The mindprint side in a fresh process of its own (as the TRL side), BLAS threads set."""
    path = tmp / f"spec-{time.time_ns()}.json"
    path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env.update(OPENBLAS_NUM_THREADS=str(spec["threads"]), OMP_NUM_THREADS=str(spec["threads"]))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--side-spec", str(path)],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"the mindprint side failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_mindprint(spec: dict) -> dict:
    import mlx.core as mx
    import numpy as np

    from mindprint_mlx.models import load
    from mindprint_mlx.ppo import PPOConfig, PPOTrainer

    model, tok = load(spec["model_dir"])
    B = len(spec["prompts"])
    cfg = PPOConfig(batch_size=B, mini_batch_size=spec["mini_batch_size"], ppo_epochs=spec["ppo_epochs"],
                    max_new_tokens=spec["new_tokens"], lora_rank=spec["lora_rank"],
                    lora_alpha=spec["lora_alpha"], lora_targets=list(spec["lora_targets"]),
                    seed=spec["seed"], save_every=0, progress=False)

    def score(tokens, lengths):   # the TRL runner's score: share of even token ids
        t, n = np.array(tokens), np.array(lengths)
        return mx.array([float((t[i, :n[i]] % 2 == 0).mean()) for i in range(t.shape[0])])

    trainer = PPOTrainer(model, tok, score, cfg)
    trainer.eos_ids = []          # no stop token: every row samples exactly new_tokens tokens
    mx.reset_peak_memory()
    rows = []
    for i in range(spec["warmup"] + spec["steps"]):
        st = trainer.train_step(spec["prompts"])
        rows.append({"generation": st["ppo/time/generation"], "forward": st["ppo/time/forward"],
                     "scoring": st["ppo/time/scoring"], "update": st["ppo/time/update"],
                     "step": st["ppo/time/step"],
                     "response_tokens": st["ppo/response_length"] * B,
                     "first_ratio": st["ppo/first_minibatch_ratio_mean"]})
    kept = rows[spec["warmup"]:]
    med = {k: statistics.median(r[k] for r in kept) for k in kept[0]}
    med["advantages"] = med["step"] - med["generation"] - med["forward"] - med["scoring"] - med["update"]
    med["tokens_per_sec"] = statistics.median(r["response_tokens"] / r["step"] for r in kept)
    med["peak_over_base"] = mx.get_peak_memory() / trainer.base_bytes
    med["steps"] = [{k: r[k] for k in ("step", "generation", "forward", "update")} for r in kept]
    return med


# ---------------------------------------------------------------------- main

def split(r: dict) -> str:
    """The time split of the median step (one step's own figures, so they add up)."""
    steps = sorted(r["steps"], key=lambda x: x["step"])
    m = steps[len(steps) // 2]
    parts = [("gen", m["generation"]), ("fwd", m["forward"]), ("upd", m["update"]),
             ("other", m["step"] - m["generation"] - m["forward"] - m["update"])]
    return " / ".join(f"{k} {v:.2f}" for k, v in parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="4,8,16")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--lora-rank", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per side (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps per side")
    p.add_argument("--rounds", type=int, default=3,
                   help="repeat each batch's pair (sides alternate order); the best round of each "
                        "side is kept (one round swings by 2x on a loaded machine)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=None, help="HF model directory (default: build bench.py's tiny llama)")
    p.add_argument("--trl-venv", "--venv", dest="venv", type=Path,
                   default=Path(os.environ.get("MINDPRINT_TRL_VENV", DEFAULT_VENV)),
                   help="the TRL side's virtualenv, created on first use "
                        "(default: $MINDPRINT_TRL_VENV or ~/.cache/mindprint/trl-venv)")
    p.add_argument("--only", choices=["both", "mindprint", "trl"], default="both")
    p.add_argument("--json", default=None)
    p.add_argument("--side-spec", default=None, help=argparse.SUPPRESS)   # internal: one mindprint run
    args = p.parse_args(argv)
    if args.side_spec:
        print(json.dumps(run_mindprint(json.loads(Path(args.side_spec).read_text()))))
        return 0
    if sys.platform.startswith("linux") and "openblas" not in os.environ.get("LD_PRELOAD", ""):
        print("note: OpenBLAS is not preloaded; MLX's CPU matmuls will be far slower "
              "(export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3)")
    py = ensure_venv(args.venv) if args.only != "mindprint" else None

    import mlx.core as mx

    sys.path.insert(0, str(HERE))
    import bench  # noqa: E402  (this directory's bench.py: the same model and corpus)

    from mindprint_mlx.data.batching import encode_prompt
    from mindprint_mlx.models import load
    from mindprint_mlx.models.tiny import build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="mindprint-vs-trl-"))
    texts = bench.corpus()
    model_dir = args.model or str(build_tiny_model(tmp / "model", arch="llama", seed=0, texts=texts,
                                                   dtype="float32", max_position_embeddings=1024,
                                                   **bench.SIZES["tiny"]))
    _, tok = load(model_dir)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    all_prompts = [encode_prompt(tok, [{"role": "user", "content": t}]) for t in texts[:max(batches)]]
    results = []
    for B in batches:
        spec = {"model_dir": str(model_dir), "prompts": all_prompts[:B], "new_tokens": args.new_tokens,
                "lora_rank": args.lora_rank, "lora_alpha": float(args.lora_rank), "lora_targets": TARGETS,
                "ppo_epochs": args.ppo_epochs, "mini_batch_size": B, "steps": args.steps,
                "warmup": args.warmup, "threads": args.threads, "seed": 0}
        best = {}
        for rnd in range(args.rounds):
            order = ["trl", "mindprint"] if rnd % 2 == 0 else ["mindprint", "trl"]
            for side in order:
                if args.only not in ("both", side):
                    continue
                print(f"batch {B}: {side} (round {rnd + 1}) ...", flush=True)
                r = run_trl(py, spec, tmp) if side == "trl" else run_mindprint_subprocess(spec, tmp)
                if side not in best or r["tokens_per_sec"] > best[side]["tokens_per_sec"]:
                    best[side] = r
        row = {"batch": B, "prompt_tokens": [len(q) for q in spec["prompts"]], **best}
        if "trl" in best and "mindprint" in best:
            row["ratio"] = best["mindprint"]["tokens_per_sec"] / best["trl"]["tokens_per_sec"]
        results.append(row)
        print("  " + "; ".join(f"{s} {best[s]['tokens_per_sec']:.0f} tok/s ({split(best[s])} s)"
                               for s in best) + (f"; ratio {row['ratio']:.2f}" if "ratio" in row else ""),
              flush=True)

    load_avg = os.getloadavg() if hasattr(os, "getloadavg") else None
    print()
    print(f"model: {args.model or 'tiny llama ' + str(bench.SIZES['tiny'])}; "
          f"{args.new_tokens} new tokens, LoRA r={args.lora_rank} on {'/'.join(TARGETS)}, "
          f"{args.ppo_epochs} PPO epochs, one minibatch; {args.threads} threads")
    trl_v = next((r["trl"]["versions"] for r in results if "trl" in r), None)
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, mlx {mx.__version__}; "
          f"TRL side: {trl_v}; load average {load_avg}")
    print("| batch | mindprint tok/s | TRL+peft tok/s | ratio | mindprint split (s) | TRL split (s) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        m, t = r.get("mindprint"), r.get("trl")
        print(f"| {r['batch']} | {m['tokens_per_sec']:.0f} | " if m else f"| {r['batch']} | - | ", end="")
        print(f"{t['tokens_per_sec']:.0f} | " if t else "- | ", end="")
        print(f"{r['ratio']:.2f} | " if "ratio" in r else "- | ", end="")
        print(f"{split(m) if m else '-'} | {split(t) if t else '-'} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "load_average": load_avg}, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
