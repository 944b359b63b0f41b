#!/usr/bin/env python
"""Benchmarks: mindprint vs mlx-lm on the same model and data, in one run.

    python scripts/bench.py                       # tiny llama: 4 layers x 256 wide
    python scripts/bench.py --size 50m            # 8 layers x 768 wide, vocab 8k (~69M params)
    python scripts/bench.py --only sft,rollout    # a subset: sft, rollout, ppo, quant, gc
    python scripts/bench.py --json out.json

Prints a markdown table: SFT tokens/s (mindprint's train_sft vs mlx-lm's LoRA trainer,
`--sft-rounds` paired rounds, and mindprint's step compiled once), rollout tokens/s
(mindprint's PPO rollout vs mlx_lm.generate.batch_generate, `--repeats` paired rounds),
one PPO step's time split and peak memory over the base weights, 4-bit and 8-bit bases,
gradient checkpointing on and off, each beside the memory planner's estimate. Parts whose modules are missing are reported as skipped.
On Linux, run with OpenBLAS preloaded (scripts/test.sh does it; see README).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

SIZES = {
    # the baseline benchmark model, a 3.3M llama (mlx_lm.lora ~2,550 tok/s, batch_generate ~1,070 tok/s here)
    "tiny": dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512,
                 vocab_size=2048),
    "50m": dict(hidden_size=768, num_layers=8, num_heads=12, num_kv_heads=4, intermediate_size=2048,
                vocab_size=8192),
}
TARGETS = ["o_proj", "v_proj", "up_proj", "down_proj"]
MLX_LM_KEYS = ["self_attn.o_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"]


def corpus(n_words: int = 3000, n_sent: int = 1500, seed: int = 0) -> list[str]:
    """Sentences over a large synthetic vocabulary, so a big BPE vocab is actually used."""
    rng = np.random.default_rng(seed)
    syll = ["ka", "lo", "mi", "ne", "tu", "ra", "so", "vi", "de", "po", "shi", "an", "el", "or"]
    words = sorted({"".join(rng.choice(syll, rng.integers(1, 4))) + str(i % 7 if i % 3 else "")
                    for i in range(n_words)})
    return [" ".join(rng.choice(words, rng.integers(8, 20))) + "." for _ in range(n_sent)]


def sft_records(texts: list[str], n: int) -> list[tuple[list[dict], str]]:
    out = []
    for i in range(n):
        a, b, c = texts[(3 * i) % len(texts)], texts[(3 * i + 1) % len(texts)], texts[(3 * i + 2) % len(texts)]
        out.append(([{"role": "user", "content": a}], b + " " + c))
    return out


def peak_of(fn):
    mx.clear_cache()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    res = fn()
    return res, mx.get_peak_memory(), time.perf_counter() - t0


def paired_rounds(first, second, rounds: int) -> tuple[list, list]:
    """`rounds` rounds of both sides (`first` goes first in round 1, then they alternate),
    so each round's pair saw the same machine load: (first's results, second's results),
    one per round."""
    a, b = [], []
    for i in range(rounds):
        order = ((first, a), (second, b)) if i % 2 == 0 else ((second, b), (first, a))
        for fn, out in order:
            out.append(fn())
    return a, b


def weight_bytes(model) -> int:
    from mlx.utils import tree_flatten
    return sum(v.nbytes for k, v in tree_flatten(model.parameters()) if ".adapters." not in k)


class Bench:
    def __init__(self, args):
        self.args = args
        self.rows: list[tuple[str, str, str, str]] = []   # (what, mindprint, reference, ratio)
        self.notes: list[str] = []
        self.data: dict = {}
        self.tmp = Path(tempfile.mkdtemp(prefix="mindprint-bench-"))
        from mindprint_mlx.models.tiny import build_tiny_model
        texts = corpus()
        self.texts = texts
        kw = dict(SIZES[args.size])
        self.model_dir = build_tiny_model(self.tmp / "model", arch="llama", seed=0, texts=texts,
                                          dtype="float32", max_position_embeddings=1024, **kw)
        self.records = sft_records(texts, args.sft_rows)

    def load(self, quantize=None):
        from mindprint_mlx.models import load
        return load(self.model_dir, quantize=quantize)

    def add(self, what, mine, ref="", ratio=""):
        self.rows.append((what, mine, ref, ratio))
        print(f"  {what}: {mine} {('| ' + ref) if ref else ''} {('| ' + ratio) if ratio else ''}",
              flush=True)

    def skip(self, part, why):
        self.rows.append((part, f"skipped: {why}", "", ""))
        print(f"  {part}: skipped ({why})", flush=True)

    # ------------------------------------------------------------------ SFT
    def _mindprint_sft(self, compile_=None, grad_checkpoint=False, quantize=None, steps=None):
        from mindprint_mlx.train.sft import SFTConfig, train_sft
        a = self.args
        model, tok = self.load(quantize)
        steps = steps or a.sft_steps
        cfg = SFTConfig(lora_rank=8, lora_alpha=16.0, epochs=100, batch_size=a.batch, max_seq_length=256,
                        learning_rate=1e-4, warmup_ratio=0.0, save_every=10 ** 6,
                        max_steps=steps, compile=compile_, grad_checkpoint=grad_checkpoint,
                        lora_targets=TARGETS)
        out = self.tmp / f"sft-{compile_}-{grad_checkpoint}-{quantize}-{time.time_ns()}"
        base = weight_bytes(model)
        res, peak, wall = peak_of(lambda: train_sft(model, tok, self.records, cfg, out, progress=False))
        tps = [h["train/tokens_per_sec"] for h in res.history if "train/tokens_per_sec" in h]
        warm = min(a.warmup, max(len(tps) - 1, 0))
        steady = float(np.median(tps[warm:])) if tps else float("nan")
        return steady, peak, base

    def _mindprint_reward(self, quantize=None):
        """One reward-model epoch (Bradley-Terry, batch/2 pairs = batch rows) for its peak."""
        from mindprint_mlx.data.records import PreferenceRecord
        from mindprint_mlx.train.reward import RewardConfig, train_reward_model
        model, tok = self.load(quantize)
        pairs = [PreferenceRecord(tuple(m), c, " ".join(reversed(c.split())))
                 for m, c in self.records[:40]]
        cfg = RewardConfig(lora_rank=8, lora_alpha=16.0, epochs=1, batch_size=max(self.args.batch // 2, 1),
                           max_seq_length=256, lora_targets=TARGETS)
        base = weight_bytes(model)
        out = self.tmp / f"reward-{quantize}-{time.time_ns()}"
        _, peak, _ = peak_of(lambda: train_reward_model(model, tok, pairs, cfg, out, progress=False))
        return peak, base

    def _mlx_lm_sft(self):
        from mlx_lm import load as mlx_load
        from mlx_lm.tuner.datasets import CacheDataset, ChatDataset
        from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback, train
        from mlx_lm.tuner.utils import linear_to_lora_layers
        import mlx.optimizers as optim
        a = self.args
        model, tok = mlx_load(str(self.model_dir))
        model.freeze()
        linear_to_lora_layers(model, len(model.layers),
                              {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": MLX_LM_KEYS})
        data = [{"messages": m + [{"role": "assistant", "content": c}]} for m, c in self.records]
        ds = CacheDataset(ChatDataset(data, tok, mask_prompt=True))
        reports = []

        class CB(TrainingCallback):
            def on_train_loss_report(self, info):
                # mlx-lm's own tokens/s counts only the loss tokens (the completion, with
                # mask_prompt); count every token of the rows, as mindprint does.
                reports.append(info["iterations_per_second"])

        targs = TrainingArgs(batch_size=a.batch, iters=a.sft_steps, steps_per_report=a.report_every,
                             steps_per_eval=10 ** 9, val_batches=0, max_seq_length=256,
                             adapter_file=str(self.tmp / "mlx_lm_adapters.safetensors"),
                             steps_per_save=10 ** 9)
        import contextlib
        import io
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            _, peak, _ = peak_of(lambda: train(model, optim.Adam(learning_rate=1e-4), ds, None, targs,
                                               training_callback=CB()))
        mean_len = float(np.mean([len(ds[i][0]) for i in range(len(ds))]))
        steady = float(np.median(reports[1:] if len(reports) > 1 else reports)) * a.batch * mean_len
        return steady, peak

    def sft(self):
        print("SFT ...", flush=True)
        try:
            import mindprint_mlx.train.sft  # noqa: F401
        except ImportError as e:
            return self.skip("SFT tokens/s", f"mindprint_mlx.train.sft missing ({e})")
        # `sft_rounds` paired rounds of mlx_lm.lora and mindprint's default step on this
        # backend (mx.compile on a GPU only), alternating which goes first: a round's ratio
        # pairs runs that saw the same machine load; the median of the rounds is the figure
        a = self.args
        r_runs, m_runs = paired_rounds(self._mlx_lm_sft, lambda: self._mindprint_sft(compile_=None),
                                       a.sft_rounds)      # mlx_lm.lora goes first in round 1
        mines, refs = [m[0] for m in m_runs], [r[0] for r in r_runs]
        (_, peak, base), (_, ref_peak) = m_runs[-1], r_runs[-1]
        ratios = [m / r for m, r in zip(mines, refs)]
        med = float(np.median(ratios))
        default = "mx.compile" if mx.default_device().type == mx.DeviceType.gpu else "no mx.compile"
        self.add(f"SFT tokens/s (default step: {default}; median of {len(ratios)} paired rounds)",
                 f"{np.median(mines):,.0f}", f"mlx_lm.lora {np.median(refs):,.0f}",
                 f"{med:.2f} (rounds {', '.join(f'{r:.2f}' for r in ratios)})")
        if default == "no mx.compile":       # the compiled step once, beside the last round
            mine_c, _, _ = self._mindprint_sft(compile_=True)
            self.add("SFT tokens/s (mx.compile forced, one run)", f"{mine_c:,.0f}",
                     f"mlx_lm.lora {refs[-1]:,.0f} (last round)", f"{mine_c / refs[-1]:.2f}")
        else:
            mine_c = None
        self.add("SFT peak memory", f"{peak / 2**20:,.1f} MiB ({peak / base:.2f}x base)",
                 f"mlx_lm.lora {ref_peak / 2**20:,.1f} MiB", f"{peak / ref_peak:.2f}")
        self.data["sft"] = dict(mindprint_tps=mines, mlx_lm_tps=refs, ratios=ratios, ratio_median=med,
                                mindprint_tps_compiled=mine_c, peak=peak, mlx_lm_peak=ref_peak, base=base)

    # ------------------------------------------------------------------ rollout
    def rollout(self):
        print("rollout ...", flush=True)
        try:
            from mindprint_mlx.ppo.rollout import generate_batch
        except ImportError as e:
            return self.skip("rollout tokens/s", f"mindprint_mlx.ppo.rollout missing ({e})")
        from mlx_lm.generate import batch_generate
        from mlx_lm.sample_utils import make_sampler
        from mindprint_mlx.data.batching import encode_prompt, pad_id
        a = self.args
        model, tok = self.load()
        prompts = [encode_prompt(tok, m) for m, _ in self.records[:a.gen_batch]]
        never = [model.args.vocab_size + 7]     # no EOS: every row generates max_new tokens

        def mine():
            g = generate_batch(model, prompts, a.new_tokens, never, pad_id(tok), 1.0, 1.0,
                               mx.random.key(1))
            return int(sum(g.response_lengths))

        def ref():
            r = batch_generate(model, tok, prompts, max_tokens=a.new_tokens, return_token_ids=True,
                               sampler=make_sampler(temp=1.0))
            return sum(len(t) for t in r.token_ids)

        # warm up both (first-call allocations and kernels), then `repeats` rounds,
        # the two sides alternating which goes first; a round's ratio pairs runs that saw
        # the same machine load, and their median is the figure (best of each beside it)
        generate_batch(model, prompts, 4, never, pad_id(tok), 1.0, 1.0, mx.random.key(0))
        batch_generate(model, tok, prompts, max_tokens=4, sampler=make_sampler(temp=1.0))
        def tps(fn):
            n, _, dt = peak_of(fn)
            return n / dt

        ms, rs = paired_rounds(lambda: tps(mine), lambda: tps(ref), a.repeats)
        ratios = [m / r for m, r in zip(ms, rs)]
        med = float(np.median(ratios))
        self.add(f"rollout tokens/s ({a.gen_batch} x {a.new_tokens} new, T=1; median of "
                 f"{len(ratios)} paired rounds, best of each)",
                 f"{np.median(ms):,.0f} (best {max(ms):,.0f})",
                 f"batch_generate {np.median(rs):,.0f} (best {max(rs):,.0f})",
                 f"{med:.2f} (quartiles {np.percentile(ratios, 25):.2f}-{np.percentile(ratios, 75):.2f}, "
                 f"{np.mean(np.array(ratios) >= 1):.0%} of rounds >= 1)")
        self.data["rollout"] = dict(mindprint_tps=ms, mlx_lm_tps=rs, ratios=ratios, ratio_median=med)

    # ------------------------------------------------------------------ PPO
    def _ppo(self, quantize=None, grad_checkpoint=False):
        from mindprint_mlx.models import lora
        from mindprint_mlx.ppo.trainer import PPOConfig, train_ppo
        a = self.args
        model, tok = self.load(quantize)
        # The pipeline's situation: a frozen SFT adapter under the trained PPO adapter.
        lora.apply_lora(model, "sft", targets=TARGETS, r=8, alpha=16.0, trainable=False)
        base = weight_bytes(model)
        cfg = PPOConfig(steps=a.ppo_steps, batch_size=a.gen_batch,
                        mini_batch_size=a.ppo_mini_batch or a.gen_batch,
                        forward_batch_size=a.forward_batch or None,
                        ppo_epochs=a.ppo_epochs, max_new_tokens=a.new_tokens, lora_rank=8,
                        lora_alpha=16.0, lora_targets=TARGETS, save_every=0, progress=False)
        if grad_checkpoint and hasattr(cfg, "grad_checkpoint"):
            cfg.grad_checkpoint = True

        def reward_fn(tokens, lengths):
            # a cheap deterministic score: share of even token ids in the row
            t = np.array(tokens)
            L = np.array(lengths)
            return mx.array([float((t[i, :L[i]] % 2 == 0).mean()) for i in range(t.shape[0])])

        prompts = [m for m, _ in self.records[:4 * a.gen_batch]]
        res, peak, wall = peak_of(lambda: train_ppo(model, tok, prompts, reward_fn, cfg,
                                                    self.tmp / f"ppo-{quantize}-{time.time_ns()}",
                                                    frozen_adapters=["sft"]))
        return res.history, peak, base

    def ppo(self):
        print("PPO ...", flush=True)
        try:
            import mindprint_mlx.ppo.trainer  # noqa: F401
        except ImportError as e:
            return self.skip("PPO step", f"mindprint_mlx.ppo.trainer missing ({e})")
        hist, peak, base = self._ppo()
        last = [h for h in hist if "ppo/time/step" in h][-1]
        split = {k.split("/")[-1]: last[k] for k in ("ppo/time/generation", "ppo/time/forward",
                                                      "ppo/time/scoring", "ppo/time/update")}
        tot = last["ppo/time/step"]
        mb = f" (minibatch {self.args.ppo_mini_batch or self.args.gen_batch}, forward batch " \
             f"{self.args.forward_batch or self.args.gen_batch})"
        self.add("PPO step time (last step)" + mb, f"{tot:.2f} s", " / ".join(
            f"{k} {v:.2f} s ({100 * v / tot:.0f}%)" for k, v in split.items()))
        # the trainer's own memory plan (activation_budget: checkpointing, micro-batches)
        gc, micro = bool(last.get("ppo/grad_checkpoint", 0)), int(last.get("ppo/micro_batches", 1))
        est = self._estimate("ppo", gc=gc, micro=micro)
        mb += f" [grad checkpoint {'on' if gc else 'off'}, {micro} micro-batch{'es' if micro > 1 else ''}]"
        self.add("PPO peak memory / base weights" + mb, f"{peak / base:.2f}x ({peak / 2**20:,.1f} MiB, "
                 f"base {base / 2**20:,.1f} MiB)", f"planner {est / 2**20:,.1f} MiB", f"{est / peak:.2f}")
        self.data["ppo"] = dict(time=split, step=tot, peak=peak, base=base, estimate=est)

    def _estimate(self, phase, quantize=None, gc=False, micro=1):
        from mindprint_mlx.memory import estimate
        a = self.args
        seq = 96 if phase != "ppo" else None
        if phase == "ppo":
            mb = a.ppo_mini_batch or a.gen_batch
            return estimate(self.model_dir, "ppo", batch=a.gen_batch, seq_len=40 + a.new_tokens,
                            prompt_len=40, max_new_tokens=a.new_tokens, lora_rank=8,
                            targets=TARGETS, quantize=quantize, grad_checkpoint=gc,
                            mini_batch=-(-mb // micro),
                            forward_batch=a.forward_batch or None).total
        return estimate(self.model_dir, phase, batch=a.batch, seq_len=seq, lora_rank=8,
                        targets=TARGETS, quantize=quantize, grad_checkpoint=gc).total

    # ------------------------------------------------------------------ memory
    def quant(self):
        print("quantized bases ...", flush=True)
        try:
            import mindprint_mlx.train.sft  # noqa: F401
        except ImportError as e:
            return self.skip("4/8-bit memory", f"mindprint_mlx.train.sft missing ({e})")
        out = {}
        for q in (None, 8, 4):
            tps, peak, base = self._mindprint_sft(quantize=q, steps=4)
            label = f"{q}-bit" if q else "fp32"
            out[label] = dict(base=base, peak=peak, tps=tps)
            self.add(f"SFT {label} base", f"weights {base / 2**20:,.1f} MiB, peak {peak / 2**20:,.1f} MiB",
                     f"{tps:,.0f} tok/s", f"peak/base {peak / base:.2f}")
        for q in (None, 8, 4):
            peak, base = self._mindprint_reward(quantize=q)
            label = f"{q}-bit" if q else "fp32"
            out[f"reward-{label}"] = dict(base=base, peak=peak)
            self.add(f"reward model {label} base", f"weights {base / 2**20:,.1f} MiB, "
                     f"peak {peak / 2**20:,.1f} MiB", "", f"peak/base {peak / base:.2f}")
        try:
            import mindprint_mlx.ppo.trainer  # noqa: F401
            _, peak, base = self._ppo(quantize=4)
            self.add("PPO 4-bit base", f"weights {base / 2**20:,.1f} MiB, peak {peak / 2**20:,.1f} MiB",
                     "", f"peak/base {peak / base:.2f}")
            out["ppo-4bit"] = dict(base=base, peak=peak)
        except ImportError:
            pass
        self.data["quant"] = out

    def gc(self):
        print("gradient checkpointing ...", flush=True)
        try:
            import mindprint_mlx.train.sft  # noqa: F401
        except ImportError as e:
            return self.skip("grad checkpointing", f"mindprint_mlx.train.sft missing ({e})")
        res = {}
        for gc in (False, True):
            tps, peak, base = self._mindprint_sft(grad_checkpoint=gc, steps=4)
            res[gc] = (tps, peak)
        saved = 1 - res[True][1] / res[False][1]
        self.add("SFT grad checkpointing off / on", f"peak {res[False][1] / 2**20:,.1f} -> "
                 f"{res[True][1] / 2**20:,.1f} MiB ({100 * saved:.0f}% less)",
                 f"{res[False][0]:,.0f} -> {res[True][0]:,.0f} tok/s", f"{res[True][1] / res[False][1]:.2f}")
        self.data["grad_checkpoint"] = {"off": res[False], "on": res[True]}

    def table(self) -> str:
        n_params = sum(int(np.prod(v.shape)) for v in _params(self.model_dir))
        head = (f"model: tiny llama `{self.args.size}` ({n_params / 1e6:.1f}M params, "
                f"{SIZES[self.args.size]}), fp32; batch {self.args.batch}, SFT rows ~"
                f"{self._mean_row_len():.0f} tokens\n"
                f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus, "
                f"{platform.system()}, mlx {mx.__version__} ({mx.default_device()}); "
                f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '-')}\n")
        lines = [head, "| measurement | mindprint | reference | ratio |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in self.rows]
        return "\n".join(lines + [""] + [f"- {n}" for n in self.notes])

    def _mean_row_len(self) -> float:
        from mindprint_mlx.data.batching import encode_pair
        _, tok = self.load()
        return float(np.mean([len(encode_pair(tok, m, c, 256)[0]) for m, c in self.records[:50]]))


def _params(model_dir):
    from safetensors.numpy import load_file
    return list(load_file(str(Path(model_dir) / "model.safetensors")).values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--only", default="sft,rollout,ppo,quant,gc")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--sft-rows", type=int, default=256)
    p.add_argument("--sft-steps", type=int, default=30)
    p.add_argument("--sft-rounds", type=int, default=5,
                   help="paired SFT rounds (mlx_lm.lora and mindprint, alternating order)")
    p.add_argument("--report-every", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3, help="SFT steps left out of tokens/s (compile)")
    p.add_argument("--gen-batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=9,
                   help="paired rollout rounds (mindprint and batch_generate, alternating order)")
    p.add_argument("--ppo-steps", type=int, default=2)
    p.add_argument("--ppo-epochs", type=int, default=1)
    p.add_argument("--ppo-mini-batch", type=int, default=0, help="PPO minibatch rows (0: all)")
    p.add_argument("--forward-batch", type=int, default=0,
                   help="rows per teacher-forced pass in PPO rollouts (0: all)")
    p.add_argument("--json", default=None, help="Also write the figures as JSON here.")
    args = p.parse_args(argv)
    if sys.platform.startswith("linux") and "openblas" not in os.environ.get("LD_PRELOAD", ""):
        print("note: OpenBLAS is not preloaded; MLX's CPU matmuls will be ~35x slower "
              "(export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3)")
    b = Bench(args)
    for part in [x.strip() for x in args.only.split(",") if x.strip()]:
        try:
            getattr(b, part)()
        except Exception as e:  # noqa: BLE001 - one broken part must not hide the others
            traceback.print_exc()
            b.skip(part, f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    print()
    print(b.table())
    if args.json:
        from mindprint_mlx.io import atomic_write_json
        atomic_write_json(args.json, b.data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
