"""Training state on disk: one directory, swapped in atomically, that resumes a run exactly.

A checkpoint holds the trainable tensors, the optimizer's state, the RNG key and a JSON
record (for the LoRA trainers the loop's `TrainState`: step, position in the data order,
running sums, the run's config and data fingerprint).
It is built under a temporary name and renamed into place, so a run killed at any moment
leaves the previous complete checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from ..errors import MindprintError
from ..guards import check_finite_tensors
from ..io import atomic_dir, load_safetensors

WEIGHTS = "trainable.safetensors"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
STATE = "state.json"


def fingerprint(obj: Any) -> str:
    """A short stable hash of JSON-able data (configs, token lists)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_checkpoint(ckpt_dir: str | Path, module: nn.Module, optimizer: optim.Optimizer,
                    state: Mapping[str, Any]) -> Path:
    """Write trainable parameters, optimizer state, RNG and `state` into `ckpt_dir` atomically."""
    weights = dict(tree_flatten(module.trainable_parameters()))
    opt = dict(tree_flatten(optimizer.state))
    rng = {f"key{i}": k for i, k in enumerate(mx.random.state)}
    mx.eval(weights, opt, rng)
    out = Path(ckpt_dir)
    check_finite_tensors({**weights, **{f"optimizer.{k}": v for k, v in opt.items()}},
                         f"checkpoint {out}")
    with atomic_dir(out) as tmp:
        mx.save_safetensors(str(tmp / WEIGHTS), weights)
        mx.save_safetensors(str(tmp / OPTIMIZER), opt)
        mx.save_safetensors(str(tmp / RNG), rng)
        (tmp / STATE).write_text(json.dumps(dict(state), indent=2, sort_keys=True, default=str) + "\n")
    return out


def read_checkpoint_state(ckpt_dir: str | Path) -> dict | None:
    """The checkpoint's JSON record, or None when there is no complete checkpoint."""
    d = Path(ckpt_dir)
    if not all((d / f).is_file() for f in (WEIGHTS, OPTIMIZER, RNG, STATE)):
        return None
    try:
        state = json.loads((d / STATE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MindprintError(f"{d / STATE}: unreadable checkpoint record ({e})") from None
    if not isinstance(state, dict):
        raise MindprintError(f"{d / STATE}: expected a JSON object, got {type(state).__name__}")
    return state


def last_good(ckpt_dir: str | Path) -> str:
    """For an error message: the checkpoint a run can go back to (never a non-finite one:
    `save_checkpoint` refuses those), or that there is none yet."""
    try:
        kept = read_checkpoint_state(ckpt_dir)
    except MindprintError:
        kept = None
    if not kept:
        return "no checkpoint had been written yet"
    return f"the last good checkpoint (step {kept.get('step')}) is kept in {ckpt_dir}"


def _set_path(tree: Any, path: str, value: mx.array) -> None:
    parts = path.split(".")
    node = tree
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def restore_checkpoint(ckpt_dir: str | Path, module: nn.Module, optimizer: optim.Optimizer) -> dict:
    """Load tensors, optimizer state and RNG from `ckpt_dir` into `module`/`optimizer`.

    Call before compiling a step over `optimizer.state` (the state dict is replaced).
    """
    d = Path(ckpt_dir)
    state = read_checkpoint_state(d)
    if state is None:
        raise MindprintError(f"{d}: no complete checkpoint to resume from")
    weights = load_safetensors(d / WEIGHTS)
    expected = dict(tree_flatten(module.trainable_parameters()))
    if set(weights) != set(expected):
        missing = sorted(set(expected) - set(weights))[:3]
        extra = sorted(set(weights) - set(expected))[:3]
        raise MindprintError(f"{d / WEIGHTS} does not match this model's trainable parameters "
                             f"(missing {missing}, unexpected {extra}); was it written by "
                             "another model or LoRA setting?")
    for k, v in weights.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise MindprintError(f"{d / WEIGHTS}: {k} has shape {tuple(v.shape)}, the model "
                                 f"expects {tuple(expected[k].shape)}")
    module.load_weights(list(weights.items()), strict=False)
    optimizer.init(module.trainable_parameters())
    saved = load_safetensors(d / OPTIMIZER)
    current = dict(tree_flatten(optimizer.state))
    if set(saved) != set(current):
        raise MindprintError(f"{d / OPTIMIZER} does not match this optimizer's state "
                             "(another optimizer or LoRA setting?)")
    for k, v in saved.items():
        _set_path(optimizer.state, k, v)
    # mx.random.state cannot be assigned; a key (hi, lo) is exactly what seed(hi << 32 | lo) sets.
    hi, lo = (int(x) for x in load_safetensors(d / RNG)["key0"].tolist())
    mx.random.seed((hi << 32) | lo)
    mx.eval(module.parameters(), optimizer.state)
    return state


# ------------------------------------------------------------ data parallel (mx.distributed)

def read_state_on_main(ckpt_dir: str | Path, resume: bool) -> dict | None:
    """The checkpoint record as rank 0 sees it, on every rank (None: start fresh).

    Rank 0 alone writes checkpoints, so its disk decides whether a run resumes; the other
    ranks (possibly on other Macs) get the decision and, in `restore_everywhere`, the
    tensors. On one process this is `read_checkpoint_state` when `resume`.
    """
    from .. import distributed as dist

    if dist.size() == 1:
        return read_checkpoint_state(ckpt_dir) if resume else None
    got: Any = None
    if resume and dist.is_main():
        try:
            got = read_checkpoint_state(ckpt_dir)
        except MindprintError as e:
            got = {"__error__": str(e)}
    got = dist.broadcast_json(got)
    if isinstance(got, dict) and "__error__" in got:
        raise MindprintError(got["__error__"])
    return got


def restore_everywhere(ckpt_dir: str | Path, module: nn.Module, optimizer: optim.Optimizer) -> dict:
    """`restore_checkpoint` on rank 0, then its weights, optimizer state and RNG key copied
    to every rank (identical to `restore_checkpoint` on one process)."""
    from .. import distributed as dist

    if dist.size() == 1:
        return restore_checkpoint(ckpt_dir, module, optimizer)
    err = None
    state: dict | None = None
    if dist.is_main():
        try:
            state = restore_checkpoint(ckpt_dir, module, optimizer)
        except MindprintError as e:
            err = str(e)
    else:
        optimizer.init(module.trainable_parameters())
    err = dist.broadcast_json(err)
    if err:
        raise MindprintError(err)
    weights = dist.broadcast(dict(tree_flatten(module.trainable_parameters())))
    module.load_weights(list(weights.items()), strict=False)
    for k, v in dist.broadcast(dict(tree_flatten(optimizer.state))).items():
        _set_path(optimizer.state, k, v)
    hi, lo = (int(x) for x in dist.broadcast(mx.random.state[0]).tolist())
    mx.random.seed((hi << 32) | lo)
    state = dist.broadcast_json(state)
    mx.eval(module.parameters(), optimizer.state)
    return state
