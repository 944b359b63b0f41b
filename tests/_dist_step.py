"""One data-parallel LoRA training step; launched by tests/test_distributed.py.

    mlx.launch --backend ring -n 2 -- python tests/_dist_step.py MODEL_DIR OUT_DIR
    python tests/_dist_step.py MODEL_DIR OUT_DIR            # single process, union batch

Each rank takes its rows of a fixed batch (rows of different lengths, so the ranks hold
different token counts), computes the masked-token cross-entropy gradient normalised by
the global token count, averages gradients over ranks and applies one optimizer step.
Rank 0 alone saves the adapter, the averaged gradients and a small report.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from mindprint_mlx import distributed as dist
from mindprint_mlx.io import atomic_save_safetensors, atomic_write_json
from mindprint_mlx.models import load, lora
from mindprint_mlx.models.adapters import save_adapter

BATCH, SEQ = 4, 24


def fixed_batch(vocab: int) -> tuple[mx.array, mx.array]:
    """Same on every rank: right-padded rows, mask over each row's 'completion' part."""
    rng = np.random.default_rng(123)
    tokens = rng.integers(4, vocab, size=(BATCH, SEQ)).astype(np.int32)
    mask = np.zeros((BATCH, SEQ), np.float32)
    lengths = [24, 9, 17, 13]         # rank 0 gets rows 0,1 (33 tokens); rank 1 rows 2,3 (30)
    prompts = [5, 3, 6, 4]
    for i, (n, p) in enumerate(zip(lengths, prompts)):
        tokens[i, n:] = 3              # pad
        mask[i, p:n] = 1.0
    return mx.array(tokens), mx.array(mask)


def main(model_dir: str, out_dir: str, opt_name: str = "sgd", steps: int = 1) -> None:
    rank, size, _ = dist.world()
    model, _tok = load(model_dir)
    mx.random.seed(0)                  # the same adapter init on every rank
    lora.apply_lora(model, "sft", r=4, alpha=8.0)
    # Non-zero B so that both A and B receive a gradient in the first step.
    for _, m in lora.lora_layers(model):
        a = m.adapters["sft"]
        a.lora_b = 0.05 * mx.random.normal(a.lora_b.shape)
    mx.eval(model.parameters())

    tokens, mask = fixed_batch(model.args.vocab_size)
    rows = dist.shard_batch(tokens.shape[0], rank, size)
    tokens, mask = tokens[rows], mask[rows]
    inputs, targets, tmask = tokens[:, :-1], tokens[:, 1:], mask[:, 1:]
    denom = dist.token_loss_scale(tmask.sum())   # global token count / size

    def loss_fn(m):
        logits = m(inputs).astype(mx.float32)
        ce = nn.losses.cross_entropy(logits, targets, reduction="none")
        return (ce * tmask).sum() / denom

    opt = optim.SGD(learning_rate=0.5) if opt_name == "sgd" else optim.Adam(learning_rate=1e-2)
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    losses = []
    grads = None
    for _ in range(steps):
        loss, grads = loss_and_grad(model)
        grads = dist.average_gradients(grads)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
        losses.append(dist.global_mean(loss).item())

    # The other exact form: each rank's *mean* token loss (what a trainer computes), its
    # gradient averaged with the local token count as weight.
    def mean_loss_fn(m):
        logits = m(inputs).astype(mx.float32)
        ce = nn.losses.cross_entropy(logits, targets, reduction="none")
        return (ce * tmask).sum() / mx.maximum(tmask.sum(), 1.0)

    _, wgrads = nn.value_and_grad(model, mean_loss_fn)(model)
    wgrads = dist.average_gradients(wgrads, weight=tmask.sum())
    mx.eval(wgrads)

    # rows dealt as `shard` deals them (global row g on rank g % size), widths differing by rank
    mine = [[g] * (1 + rank) for g in dist.shard(range(2 * size))]
    gathered = dist.gather_rows(mx.array(mine, dtype=mx.int32), 1 + size, fill=-1)
    if dist.is_main():
        out = Path(out_dir)
        save_adapter(model, "sft", out / "adapter")
        atomic_save_safetensors(out / "grads.safetensors", dict(tree_flatten(grads)))
        atomic_save_safetensors(out / "weighted_grads.safetensors", dict(tree_flatten(wgrads)))
        atomic_write_json(out / "report.json", {"size": size, "losses": losses,
                                                "global_tokens": float(denom.item() * size),
                                                "gathered": gathered.tolist()})
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(sys.argv[3:4] or ["sgd"]),
         *([int(sys.argv[4])] if len(sys.argv) > 4 else []))
