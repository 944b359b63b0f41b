"""Short full-parameter pretraining of a small Hugging Face-format model on chat Q&A pairs.

Used to make the `mindprint demo` base model speak: the tiny random llama is trained on the
neutral market primer (`mindprint_mlx.demo.neutral_corpus`) so it answers questions in its
domain in real words before any persona training. Each pair is chat-templated (user
question, assistant answer) in the one token layout of `data.batching.encode_pair`; the loss is the
mean cross-entropy over the answer tokens and the closing EOS (the prompt is context only).
Every parameter trains (no LoRA) with bias-corrected AdamW, linear warm-up then cosine decay.

Deterministic: the batch order comes from numpy's PCG64(`seed`), the model has no dropout,
and MLX's CPU kernels are deterministic, so the same inputs give the same weights.
The trained weights replace `model.safetensors` in place (atomically); the rest of the
directory (config, tokenizer) is left as it is.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import MindprintError
from ..io import atomic_write_bytes, atomic_write_json

Pair = tuple[str, str]


def _batches(n: int, batch_size: int, steps: int, seed: int) -> list[np.ndarray]:
    """`steps` index batches: epochs of a PCG64 permutation, cut into `batch_size` pieces
    (an epoch's last short piece is dropped so every step sees `batch_size` examples)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    per_epoch = max(1, n // batch_size)
    out: list[np.ndarray] = []
    while len(out) < steps:
        perm = rng.permutation(n)
        out += [perm[i * batch_size:(i + 1) * batch_size] for i in range(per_epoch)]
    return out[:steps]


def encode_pairs(tokenizer, pairs: Sequence[Pair], max_len: int) -> list[tuple[list[int], int]]:
    """(tokens, prompt length) per pair: chat-templated question, answer tokens, EOS (cut to
    `max_len` as `data.batching.encode_pair` cuts, which always keeps some of the answer)."""
    from ..data.batching import encode_pair

    return [encode_pair(tokenizer, [{"role": "user", "content": q}], a, max_len)[:2]
            for q, a in pairs]


def pretrain(model_dir: str | os.PathLike, pairs: Sequence[Pair], steps: int = 300,
             lr: float = 3e-3, seed: int = 0, batch_size: int = 16, max_len: int = 128,
             weight_decay: float = 0.01, warmup: float = 0.05, min_lr_ratio: float = 0.1,
             compile: bool | None = None, progress: bool = True,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train every weight of the model in `model_dir` on `pairs` (question, answer) for
    `steps` AdamW steps of `batch_size` pairs and write the result back to
    `model_dir/model.safetensors` (fp32, the same tensor names). The learning rate warms up
    linearly over the first `warmup` share of the steps, then decays on a cosine to
    `min_lr_ratio * lr`. `progress`: a progress line on stderr; `log`: gets a summary line.

    Returns stats: steps, examples, batch_size, lr, seed, tokens (target tokens seen),
    loss_first / loss_final (mean loss of the first / last 10 steps), seconds (wall) and
    cpu_seconds (this process's CPU time).
    """
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    from ..data.batching import pad_id
    from ..progress import Progress
    from .load import load
    from .tiny import safetensors_bytes

    pairs = [(str(q), str(a)) for q, a in pairs]
    if not pairs:
        raise MindprintError("pretrain: no pairs to train on")
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise MindprintError("pretrain: steps, batch_size and lr must be positive")
    t0, c0 = time.perf_counter(), time.process_time()
    model_dir = Path(model_dir)
    names = set(mx.load(str(model_dir / "model.safetensors")))
    model, tok = load(model_dir)
    model.train()
    data = encode_pairs(tok, pairs, max_len)
    pad = pad_id(tok)
    batch_size = min(batch_size, len(data))

    warm = max(1, int(round(warmup * steps)))

    def schedule(step: mx.array) -> mx.array:
        step = step.astype(mx.float32)
        frac = mx.clip((step - warm) / max(1, steps - warm), 0.0, 1.0)
        cos = min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + mx.cos(math.pi * frac))
        return lr * mx.where(step < warm, (step + 1) / warm, cos)

    opt = optim.AdamW(learning_rate=schedule, weight_decay=weight_decay, bias_correction=True)

    def loss_fn(m, inputs, targets, mask):
        logits = m(inputs).astype(mx.float32)
        ce = nn.losses.cross_entropy(logits, targets, reduction="none")
        return (ce * mask).sum() / mask.sum()

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state]

    def step(inputs, targets, mask):
        loss, grads = loss_and_grad(model, inputs, targets, mask)
        opt.update(model, grads)
        return loss

    # compile=None: on a GPU only (on the CPU backend a compiled step measured no faster).
    if compile if compile is not None else mx.default_device().type == mx.gpu:
        step = mx.compile(step, inputs=state, outputs=state)

    def make_batch(idx: np.ndarray):
        rows = [data[i] for i in idx]
        # Widths rounded up to a multiple of 16: few distinct shapes for the compiled step.
        width = min(max_len, -(-max(len(t) for t, _ in rows) // 16) * 16 + 1)
        toks = np.full((len(rows), width), pad, dtype=np.int32)
        mask = np.zeros((len(rows), width - 1), dtype=np.float32)
        for r, (t, n_prompt) in enumerate(rows):
            toks[r, :len(t)] = t
            mask[r, n_prompt - 1:len(t) - 1] = 1.0   # targets: answer tokens and the EOS
        return mx.array(toks[:, :-1]), mx.array(toks[:, 1:]), mx.array(mask), int(mask.sum())

    losses: list[float] = []
    n_tokens = 0
    say = log or (lambda s: None)
    with Progress(steps, "pretrain", enabled=progress) as bar:
        for idx in _batches(len(data), batch_size, steps, seed):
            inputs, targets, mask, n = make_batch(idx)
            loss = step(inputs, targets, mask)
            mx.eval(loss, state)
            losses.append(float(loss))
            n_tokens += n
            bar.update(1, loss=losses[-1])
    if not all(math.isfinite(x) for x in losses):
        raise MindprintError("pretrain: the loss is not finite; lower lr")

    weights = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    if set(weights) != names:   # mlx-lm renamed tensors on load (sanitize): not a plain save
        raise MindprintError(f"pretrain: {model_dir}: the model's parameter names differ from "
                             "its checkpoint's; cannot write it back in the same format")
    atomic_write_bytes(model_dir / "model.safetensors",
                       safetensors_bytes(weights, "float32", metadata={"format": "pt"}))
    stats = {"steps": steps, "examples": len(data), "batch_size": batch_size, "lr": lr,
             "seed": seed, "tokens": n_tokens,
             "loss_first": float(np.mean(losses[:10])), "loss_final": float(np.mean(losses[-10:])),
             "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}
    say(f"pretrain: {steps} steps on {len(data)} pairs, loss {stats['loss_first']:.3f} -> "
        f"{stats['loss_final']:.3f} in {stats['seconds']:.1f}s")
    return stats


def write_pretrain_record(model_dir: str | os.PathLike, settings: dict, stats: dict) -> None:
    """`mindprint_pretrain.json`: how the weights were made (no timings: same bytes each build)."""
    keep = {k: v for k, v in stats.items() if k not in ("seconds", "cpu_seconds")}
    atomic_write_json(Path(model_dir) / "mindprint_pretrain.json",
                      {"settings": settings, "stats": keep})


__all__ = ["encode_pairs", "pretrain", "write_pretrain_record"]
