#!/usr/bin/env python
"""Benchmark: mindprint SFT against mlx_lm.lora on the same tiny model, data, rank, batch
and sequence length. Prints tokens/s of each (non-padding tokens through the training
step per second, steady state), their ratio and each side's peak memory.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python scripts/bench_sft.py [--steps 40] [--batch 8] [--rank 8] [--repeats 2]

Each side runs in its own process (so peak memory is its own): one warm-up pass over
every batch shape (mx.compile builds its kernels), then a timed run of --steps steps on
a freshly loaded model; tokens/s is the steady state (every epoch after the first, as
timed by each trainer's own loop). Then both sides alternate in one process for --rounds
paired runs, so that each pair sees the same load on a shared machine. Both use AdamW, LoRA on o_proj/v_proj/up_proj/down_proj of all
layers with the same rank and scale, loss on completion tokens only. mlx_lm compiles its
step; mindprint compiles on a GPU only (on the CPU backend a compiled step measured no
faster, see --compile).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

TARGETS = ["self_attn.o_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"]


def build(args, work: Path) -> tuple[Path, Path]:
    from mindprint_mlx.data import curriculum_texts, load_data_dir
    from mindprint_mlx.demo import DEMO_CURRICULUM_DIR
    from mindprint_mlx.models.tiny import build_tiny_model

    model = work / "model"
    if not (model / "config.json").exists():
        build_tiny_model(model, arch="llama", seed=0, texts=curriculum_texts(DEMO_CURRICULUM_DIR),
                         vocab_size=1024, hidden_size=args.hidden, num_layers=args.layers,
                         num_heads=4, num_kv_heads=2, intermediate_size=2 * args.hidden,
                         max_position_embeddings=1024)
    data = work / "data"
    data.mkdir(exist_ok=True)
    sft = list(load_data_dir(DEMO_CURRICULUM_DIR).sft)
    n = len(sft) // args.batch * args.batch  # whole batches only (mlx_lm drops a partial one)
    rows = [{"prompt": r.prompt[-1]["content"], "completion": r.completion} for r in sft[:n]]
    with open(data / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(data / "valid.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[:args.batch])
    return model, data


def mindprint_once(args, steps: int) -> dict:
    """Load the model, train `steps` steps with mindprint; rates from the training loop."""
    import mlx.core as mx

    from mindprint_mlx.io import read_jsonl
    from mindprint_mlx.models import load
    from mindprint_mlx.train.sft import SFTConfig, train_sft

    rows = [json.loads(x) for x in open(Path(args.data) / "train.jsonl")]
    records = [([{"role": "user", "content": r["prompt"]}], r["completion"]) for r in rows]
    cfg = SFTConfig(lora_rank=args.rank, lora_alpha=2.0 * args.rank, lora_targets=TARGETS,
                    batch_size=args.batch, epochs=10_000, max_steps=steps, learning_rate=1e-4,
                    warmup_ratio=0.0, max_grad_norm=0.0, max_seq_length=args.max_len, save_every=10**9,
                    log_every=min(steps, len(rows) // args.batch), compile=True if args.compile else None,
                    pad_to_multiple=args.pad_to_multiple)
    model, tok = load(args.model)
    mx.eval(model.parameters())
    mx.reset_peak_memory()
    with tempfile.TemporaryDirectory() as tmp:
        wall, cpu = time.perf_counter(), time.process_time()
        res = train_sft(model, tok, records, cfg, Path(tmp) / "run", progress=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rates = [x["train/tokens_per_sec"] for x in read_jsonl(Path(tmp) / "run" / "metrics.jsonl")
                 if "train/tokens_per_sec" in x]
    from mindprint_mlx.data.batching import encode_pair

    row_tokens = sum(len(encode_pair(tok, p, c, args.max_len)[0]) for p, c in records)
    processed = row_tokens * steps / (len(rows) // args.batch)
    # Steady state: each window is one epoch (same tokens); the first one (new shapes) is dropped.
    steady = rates[1:] or rates
    return {"tokens_per_sec": len(steady) / sum(1.0 / r for r in steady), "peak_memory_gb": mx.get_peak_memory() / 1e9,
            "final_loss": res.train_loss, "steps": res.steps,
            "call_tokens_per_sec": processed / wall, "tokens_per_cpu_sec": processed / cpu}


def mlx_lm_once(args, steps: int) -> dict:
    """Load the model, train `steps` steps with mlx_lm.lora's own train_model."""
    import mlx.core as mx
    from mlx_lm import lora as mlx_lora
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import CacheDataset, load_dataset
    from mlx_lm.utils import load

    class Capture(TrainingCallback):
        def __init__(self):
            self.reports = []

        def on_train_loss_report(self, info):
            self.reports.append(info)

    conf = {**mlx_lora.CONFIG_DEFAULTS, "model": args.model, "train": True, "data": args.data,
            "fine_tune_type": "lora", "optimizer": "adamw", "num_layers": args.layers,
            "batch_size": args.batch, "iters": steps, "val_batches": 1,
            "learning_rate": 1e-4, "steps_per_report": min(steps, n_batches(args)), "steps_per_eval": 10**9,
            "save_every": 10**9, "max_seq_length": args.max_len, "mask_prompt": True,
            "lora_parameters": {"rank": args.rank, "dropout": 0.0, "scale": 2.0, "keys": TARGETS}}
    model, tok = load(args.model)
    mx.eval(model.parameters())
    mx.reset_peak_memory()
    with tempfile.TemporaryDirectory() as tmp:
        ns = SimpleNamespace(**{**conf, "adapter_path": tmp})
        train_set, valid_set, _ = load_dataset(ns, tok)
        # mlx_lm reports trained (mask) tokens; count non-padding tokens as mindprint does.
        ds = CacheDataset(train_set)
        row_tokens = sum(len(ds[i][0]) for i in range(len(ds)))
        cap = Capture()
        wall, cpu = time.perf_counter(), time.process_time()
        mlx_lora.train_model(ns, model, train_set, valid_set, cap)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rep = cap.reports[-1]
    # mlx_lm's in-loop time of each report window (one epoch each); the first one is dropped.
    times, seen = [], 0
    for r in cap.reports:
        times.append((r["trained_tokens"] - seen) / r["tokens_per_second"])
        seen = r["trained_tokens"]
    steady = times[1:] or times
    processed = row_tokens * steps / (len(ds) // args.batch)
    return {"tokens_per_sec": row_tokens * len(steady) / sum(steady),
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
            "final_loss": rep["train_loss"], "steps": rep["iteration"],
            "call_tokens_per_sec": processed / wall, "tokens_per_cpu_sec": processed / cpu,
            "mlx_lm_reported_tokens_per_sec": rep["tokens_per_second"]}


SIDES = {"mindprint": mindprint_once, "mlx_lm": mlx_lm_once}


def n_batches(args) -> int:
    return sum(1 for _ in open(Path(args.data) / "train.jsonl")) // args.batch


def worker(args) -> dict:
    """One side in its own process: a warm-up pass over every batch, then the timed run."""
    once = SIDES[args.worker]
    once(args, n_batches(args))
    return once(args, args.steps)


def worker_paired(args) -> dict:
    """Both sides in one process, alternating, so each pair of runs sees the same machine load."""
    for once in SIDES.values():
        once(args, n_batches(args))
    rounds = []
    for _ in range(args.rounds):
        a = mindprint_once(args, args.steps)["tokens_per_sec"]
        b = mlx_lm_once(args, args.steps)["tokens_per_sec"]
        rounds.append({"mindprint": a, "mlx_lm": b, "ratio": a / b})
    return {"rounds": rounds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--pad-to-multiple", type=int, default=8)
    ap.add_argument("--compile", action="store_true",
                    help="force mx.compile for mindprint (default: its own choice, on a GPU only)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="separate-process runs of each side (peak memory, tokens/s)")
    ap.add_argument("--work", default=None, help="directory for the model and data (default: temp)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="alternating paired runs of both sides in one process (0 = skip)")
    ap.add_argument("--worker", choices=["mindprint", "mlx_lm", "paired"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.worker:
        out = worker_paired(args) if args.worker == "paired" else worker(args)
        print("BENCH " + json.dumps(out))
        return

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_sft."))
    work.mkdir(parents=True, exist_ok=True)
    model, data = build(args, work)
    print(f"model {model} ({args.layers} layers, {args.hidden} wide), data {data}, batch {args.batch}, "
          f"rank {args.rank}, max_len {args.max_len}, {args.steps} timed steps", flush=True)
    passthrough = [f"--steps={args.steps}", f"--batch={args.batch}", f"--rank={args.rank}",
                   f"--layers={args.layers}", f"--max-len={args.max_len}", f"--rounds={args.rounds}",
                   f"--pad-to-multiple={args.pad_to_multiple}"] + (["--compile"] if args.compile else [])

    def run_worker(kind: str) -> dict:
        proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--model", str(model),
                               "--data", str(data), *passthrough], capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("BENCH ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"{kind} worker failed (exit {proc.returncode})")
        return json.loads(lines[-1][6:])

    # 1. Each side in its own process: its own peak memory, tokens/s, tokens per CPU-second.
    results: dict[str, list[dict]] = {"mindprint": [], "mlx_lm": []}
    for rep in range(args.repeats):
        for side in ("mindprint", "mlx_lm"):
            tic = time.perf_counter()
            r = run_worker(side)
            results[side].append(r)
            print(f"  run {rep + 1} {side:9s}: {r['tokens_per_sec']:8.0f} tokens/s in the loop, "
                  f"{r['call_tokens_per_sec']:6.0f} tokens/s for the whole call, "
                  f"{r['tokens_per_cpu_sec']:6.0f} tokens/CPU-s, peak memory "
                  f"{r['peak_memory_gb'] * 1000:7.1f} MB, final loss {r['final_loss']:.3f} "
                  f"({time.perf_counter() - tic:.0f} s with warm-up)", flush=True)
    if args.repeats:
        best = {k: max(v, key=lambda r: r["tokens_per_sec"]) for k, v in results.items()}
        for side in ("mindprint", "mlx_lm"):
            print(f"{side:9s} (best of {args.repeats} processes): {best[side]['tokens_per_sec']:.0f} "
                  f"tokens/s, peak memory {best[side]['peak_memory_gb'] * 1000:.1f} MB")
        print(f"ratio, best of each: {best['mindprint']['tokens_per_sec'] / best['mlx_lm']['tokens_per_sec']:.2f}")
    # 2. Both sides alternating in one process: paired runs under the same load.
    if args.rounds:
        paired = run_worker("paired")["rounds"]
        for i, r in enumerate(paired):
            print(f"  round {i + 1}: mindprint {r['mindprint']:.0f} tokens/s, mlx_lm {r['mlx_lm']:.0f} "
                  f"tokens/s, ratio {r['ratio']:.2f}")
        ratios = sorted(r["ratio"] for r in paired)
        print(f"ratio (mindprint / mlx_lm), median of {len(ratios)} paired rounds: "
              f"{statistics.median(ratios):.2f} (range {ratios[0]:.2f}-{ratios[-1]:.2f})")

if __name__ == "__main__":
    main()
