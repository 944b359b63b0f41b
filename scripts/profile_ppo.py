#!/usr/bin/env python
"""Where a PPO step's time goes: phase times against their FLOPs and the measured matmul rate.

    python scripts/profile_ppo.py                 # batch 8, the bench_ppo_vs_trl settings
    python scripts/profile_ppo.py --batch 16 --torch ~/.cache/mindprint/trl-venv/bin/python

For one mindprint PPO step on bench.py's tiny llama (4 layers x 256, vocab 2048; LoRA r=1 on
o/v/up/down; 4 epochs, one minibatch, 64 new tokens, no stop token) it prints:
  - each phase's wall time (mx.eval at every boundary), its FLOPs (matmuls and attention,
    counted from the shapes) and the GFLOP/s it reaches;
  - MLX's (and, with --torch, PyTorch's) matmul rate on the step's own shapes, so the floor
    of each phase is FLOPs / rate;
  - one decoder layer's forward split into its matmuls and everything else (norms, RoPE,
    attention, SiLU), and the backward/forward ratio of the update;
  - Python time per step from cProfile (time not spent inside mx.eval / array copies).
Not part of the test suite. On Linux, preload OpenBLAS (scripts/test.sh).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent


def best(f, n):
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts), statistics.median(ts)


TORCH_RATE = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
out = {}
for M, K, N in json.loads(sys.argv[2]):
    a, b = torch.randn(M, K), torch.randn(K, N)
    for _ in range(3): a @ b
    ts = []
    for _ in range(20):
        t = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t)
    out[f"{M}x{K}x{N}"] = 2 * M * K * N / min(ts) / 1e9
x = torch.randn(*json.loads(sys.argv[3]))
for name, f in (("exp", torch.exp), ("sigmoid", torch.sigmoid), ("add", lambda x: x + x)):
    for _ in range(3): f(x)
    ts = []
    for _ in range(20):
        t = time.perf_counter(); f(x); ts.append(time.perf_counter() - t)
    out[name] = min(ts) / x.numel() * 1e9
print(json.dumps(out))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--torch", default=None, help="a python with torch, for its matmul rate")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    sys.path.insert(0, str(HERE))
    import bench
    from mindprint_mlx.data.batching import encode_prompt
    from mindprint_mlx.models import load, lora
    from mindprint_mlx.models.tiny import build_tiny_model
    from mindprint_mlx.ppo import PPOConfig, PPOTrainer
    from mindprint_mlx.ppo.rollout import batched_response_forward, generate_batch
    from mindprint_mlx.ppo.trainer import _Batch

    tmp = Path(tempfile.mkdtemp(prefix="mindprint-prof-"))
    texts = bench.corpus()
    d = build_tiny_model(tmp / "model", arch="llama", seed=0, texts=texts, dtype="float32",
                         max_position_embeddings=1024, **bench.SIZES["tiny"])
    model, tok = load(d)
    B, R = args.batch, args.new_tokens
    prompts = [encode_prompt(tok, [{"role": "user", "content": t}]) for t in texts[:B]]
    cfg = PPOConfig(batch_size=B, mini_batch_size=B, ppo_epochs=4, max_new_tokens=R,
                    save_every=0, progress=False)
    score = lambda t, n: mx.zeros((t.shape[0],))
    tr = PPOTrainer(model, tok, score, cfg)
    tr.eos_ids = []
    a = model.args
    H, I, V, nl = a.hidden_size, a.intermediate_size, a.vocab_size, a.num_hidden_layers
    hd = H // a.num_attention_heads
    kvd = a.num_key_value_heads * hd
    P = max(len(q) for q in prompts)
    L = P + R
    lin = 2 * (H * (H + 2 * kvd + H) + 3 * H * I)          # linear FLOPs / token / layer

    def fwd_flops(rows, length, head_rows):                 # teacher-forced forward
        return nl * rows * length * (lin + 2 * 2 * length * H) + head_rows * 2 * H * V

    gen_flops = nl * B * P * (lin + 4 * P * H) + B * R * (nl * (lin + 4 * L * H) + 2 * H * V)
    fwd = fwd_flops(B, L, B * R)

    for _ in range(2):                                       # warm up (first-call allocations)
        tr.train_step(prompts)
    key = mx.random.key(0)
    times = {}
    with lora.active_adapters(model, tr.policy_adapters):
        times["generation"] = best(lambda: generate_batch(model, prompts, R, [], tr.pad_id, 1.0, 1.0, key,
                                                          value_head=tr.value_head), args.repeats)
        gen = generate_batch(model, prompts, R, [], tr.pad_id, 1.0, 1.0, key, value_head=tr.value_head)
    with lora.active_adapters(model, tr.reference_adapters):
        times["reference pass"] = best(lambda: mx.eval(batched_response_forward(model, gen, 1.0)[0]),
                                       args.repeats)
    m = gen.response_mask
    batch = _Batch(gen.tokens, gen.prompt_lengths, gen.response_tokens, m, gen.sample_logprobs,
                   gen.sample_values, m * 0.1, m * 0.2)
    mx.eval(batch.advantages, batch.returns)
    with lora.active_adapters(model, tr.policy_adapters):
        times["update forward only"] = best(lambda: mx.eval(tr._loss(tr.policy, batch)[0]), args.repeats)

        def fb():
            (loss, st), g = tr._loss_and_grad(tr.policy, batch)
            mx.eval(loss, st, g)
        times["update fwd+bwd (one epoch)"] = best(fb, args.repeats)
    times["update (4 epochs, optimizer, syncs)"] = best(
        lambda: tr.update(batch, np.random.default_rng(0)), max(2, args.repeats // 2))
    flops = {"generation": gen_flops, "reference pass": fwd, "update forward only": fwd,
             "update fwd+bwd (one epoch)": 2 * fwd, "update (4 epochs, optimizer, syncs)": 8 * fwd}

    # matmul rates on the step's shapes
    shapes = [(B * L, H, I), (B * L, I, H), (B * L, H, H), (B * R, H, V), (B, H, I), (B, H, V)]
    rates = {}
    for M, K, N in shapes:
        x, w = mx.random.normal((M, K)), mx.random.normal((K, N))
        mx.eval(x, w)
        t, _ = best(lambda: mx.eval(x @ w), 20)
        rates[f"{M}x{K}x{N}"] = 2 * M * K * N / t / 1e9
    trates = None
    if args.torch:
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "PYTHONPATH")}
        r = subprocess.run([args.torch, "-c", TORCH_RATE, str(args.threads), json.dumps(shapes),
                            json.dumps([B, L, I])],
                           capture_output=True, text=True, env=env)
        trates = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None
    big = statistics.mean(rates[f"{M}x{K}x{N}"] for M, K, N in shapes[:3])

    # one decoder layer: matmuls against the rest
    layer = model.model.layers[0]
    h = mx.random.normal((B, L, H))
    mx.eval(h)
    with lora.active_adapters(model, []):
        t_layer, _ = best(lambda: mx.eval(layer(h, "causal", None)), 20)
        mm = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
              layer.mlp.gate_proj, layer.mlp.up_proj]
        t_mm = sum(best(lambda f=f: mx.eval(f(h)), 20)[0] for f in mm)
        hi = mx.random.normal((B, L, I))
        mx.eval(hi)
        t_mm += best(lambda: mx.eval(layer.mlp.down_proj(hi)), 20)[0]
        t_mm += best(lambda: mx.eval(layer.self_attn.o_proj(h)), 20)[0]
        q = mx.random.normal((B, a.num_attention_heads, L, hd))
        k = mx.random.normal((B, a.num_key_value_heads, L, hd))
        mx.eval(q, k)
        t_sdpa, _ = best(lambda: mx.eval(mx.fast.scaled_dot_product_attention(q, k, k, scale=hd ** -0.5,
                                                                              mask="causal")), 20)
        hg = mx.random.normal((B, L, I))
        mx.eval(hg)
        t_silu, _ = best(lambda: mx.eval(nn.silu(hg) * hg), 20)
        ns = {}
        for name, f in (("exp", mx.exp), ("sigmoid", mx.sigmoid), ("add", lambda x: x + x)):
            ns[name] = best(lambda f=f: mx.eval(f(hg)), 20)[0] / hg.size * 1e9

    # Python overhead: building the update's graph (lazy, no eval) against running it
    with lora.active_adapters(model, tr.policy_adapters):
        def build():
            return tr._loss_and_grad(tr.policy, batch)
        t_build, _ = best(build, args.repeats)
    prof = cProfile.Profile()
    prof.enable()
    tr.train_step(prompts)
    prof.disable()
    st = pstats.Stats(prof)
    waits = ("generate_batch", "_minibatch", "batched_response_forward", "train_step", "rollout")
    py = sum(v[2] for k, v in st.stats.items() if k[0] != "~" and k[2] not in waits)

    print(f"model: tiny llama {bench.SIZES['tiny']}; batch {B}, prompt <= {P}, {R} new tokens, "
          f"rows of {L} tokens; mlx {mx.__version__}, {os.cpu_count()} cpus, load {os.getloadavg()}")
    print("\n| phase | time (s, best / median) | GFLOP | GFLOP/s | floor at the big-matmul rate (s) |")
    print("|---|---|---|---|---|")
    for k, (tb, tm) in times.items():
        g = flops[k] / 1e9
        print(f"| {k} | {tb:.3f} / {tm:.3f} | {g:.1f} | {g / tb:.0f} | {g / big:.3f} |")
    print("\n| matmul (M x K x N) | MLX GFLOP/s |" + (" torch GFLOP/s |" if trates else ""))
    print("|---|---|" + ("---|" if trates else ""))
    for s_, r_ in rates.items():
        print(f"| {s_} | {r_:.0f} |" + (f" {trates.get(s_, float('nan')):.0f} |" if trates else ""))
    print(f"\none decoder layer forward ({B} x {L} tokens): {1e3 * t_layer:.1f} ms; its 7 matmuls "
          f"{1e3 * t_mm:.1f} ms ({100 * t_mm / t_layer:.0f}%), attention (SDPA) {1e3 * t_sdpa:.1f} ms, "
          f"SiLU x up {1e3 * t_silu:.1f} ms (each timed alone; norms, RoPE and adds are the "
          f"remainder, {1e3 * max(t_layer - t_mm - t_sdpa - t_silu, 0.0):.1f} ms)")
    fb_t, f_t = times["update fwd+bwd (one epoch)"][0], times["update forward only"][0]
    print(f"update: fwd+bwd / fwd = {fb_t / f_t:.2f} (FLOPs ratio ~2: the backward computes the "
          "activation gradients, as many FLOPs as the forward, and only the LoRA weights' own)")
    print("elementwise, ns an element on a (B, L, intermediate) float32 array: " + ", ".join(
        f"{k} MLX {v:.2f}" + (f" / torch {trates[k]:.2f}" if trates else "") for k, v in ns.items()))
    print(f"Python: building one fwd+bwd graph (no eval) {1e3 * t_build:.1f} ms against "
          f"{1e3 * fb_t:.0f} ms to run it; one whole step's Python code (cProfile, functions "
          f"other than those that wait on MLX) {py:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
