"""Data-parallel training on `mx.distributed`, and gradient checkpointing.

Launch any mindprint training command on several processes (one per Mac, or several on
one machine for testing) with MLX's launcher:

    mlx.launch --hostfile hosts.json --backend ring -- mindprint sft ...
    mlx.launch --backend ring -n 2 -- python script.py        # two ranks on loopback

Every rank loads the same base and data, takes its own shard of each batch
(`shard`), computes gradients on it and averages them (`average_gradients`) before the
optimizer step, so all ranks keep identical adapters. Only rank 0 writes files and logs
(`is_main`). Sampling (PPO, GRPO and RLOO rollouts) draws each row's noise as the row of the
whole batch it is (`ppo.rollout.generate_batch(draw=...)`), so the ranks together sample what
one process samples for the whole batch; `gather_rows` then hands every rank the whole batch.
A single process is a world of size 1 and every helper is then a no-op, so the same code
path runs with and without `mlx.launch`.

Around the trainers (the pipeline): `on_main` runs a piece of work on rank 0 alone (a quiz,
a file write) and hands every rank its result or its error; `fetch_dir` hands the others a
directory rank 0 wrote (an adapter) without a shared disk; `check_all` stops every rank
when a check fails on one.

Exactness: with a token-level loss, normalise the summed token loss of the local shard by
the *global* token count (`global_sum(mask.sum())`) times `size` (see
`token_loss_scale`); the averaged gradient is then exactly the single-process gradient of
the union batch.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import mlx.core as mx

from .errors import MindprintError

T = TypeVar("T")

__all__ = ["world", "rank", "size", "is_main", "shard", "shard_batch",
           "average_gradients", "all_sum", "global_sum", "global_mean", "token_loss_scale", "barrier",
           "main_only", "broadcast", "broadcast_json", "broadcast_named", "gather", "gather_rows",
           "on_main", "check_all", "fetch_dir"]

_GROUP: mx.distributed.Group | None = None


def world() -> tuple[int, int, mx.distributed.Group]:
    """(rank, size, group) of this process; (0, 1, group) when not launched distributed."""
    global _GROUP
    if _GROUP is None:
        _GROUP = mx.distributed.init()
    return _GROUP.rank(), _GROUP.size(), _GROUP


def rank() -> int:
    return world()[0]


def size() -> int:
    return world()[1]


def is_main() -> bool:
    """True on rank 0: the one process that writes files, logs and shows progress."""
    return world()[0] == 0


def shard(items: Sequence[T], rank: int | None = None, size: int | None = None) -> list[T]:
    """Rank `rank`'s share of `items`: every `size`-th item starting at `rank`.

    Deterministic, and the shards have equal length (the last `len(items) % size` items
    are dropped), so every rank runs the same number of steps and no all-reduce waits for
    a rank that has already finished. With `size == 1` it returns all items.
    """
    if rank is None or size is None:
        r, s, _ = world()
        rank = r if rank is None else rank
        size = s if size is None else size
    if size < 1 or not 0 <= rank < size:
        raise MindprintError(f"bad shard: rank {rank} of size {size}")
    n = (len(items) // size) * size
    return [items[i] for i in range(rank, n, size)]


def shard_batch(n_rows: int, rank: int | None = None, size: int | None = None) -> slice:
    """The contiguous row slice of a batch of `n_rows` that rank `rank` computes.

    Raises when the batch does not split evenly (each rank must hold the same number of
    rows, or the averaged gradient is not the union-batch gradient in general).
    """
    if rank is None or size is None:
        r, s, _ = world()
        rank = r if rank is None else rank
        size = s if size is None else size
    if n_rows % size:
        raise MindprintError(f"batch size {n_rows} is not divisible by the number of ranks "
                             f"({size}); choose a batch size that is a multiple of {size}")
    per = n_rows // size
    return slice(rank * per, (rank + 1) * per)


def global_sum(x: Any, group: mx.distributed.Group | None = None) -> mx.array:
    """The sum of `x` over all ranks (`x` itself on one process), evaluated now.

    Collectives are lazy in MLX: a rank that never evaluates one leaves the others
    waiting forever (e.g. a sum only read inside `if is_main():`). So this evaluates
    eagerly, on every rank; call it unconditionally on all ranks.
    """
    group = group or world()[2]
    x = mx.array(x) if not isinstance(x, mx.array) else x
    if group.size() == 1:
        return x
    # Reduce on the CPU stream: it works for every backend (ring/MPI run on the CPU).
    out = mx.distributed.all_sum(x, group=group, stream=mx.cpu)
    mx.eval(out)
    return out


def all_sum(x: Any, group: mx.distributed.Group | None = None) -> mx.array:
    """Lazy sum over ranks, usable inside `mx.compile`d steps and gradient code (identity on
    one process). Every rank must evaluate it; see `global_sum` for an eager one."""
    group = group or world()[2]
    x = mx.array(x) if not isinstance(x, mx.array) else x
    if group.size() == 1:
        return x
    return mx.distributed.all_sum(x, group=group, stream=mx.cpu)


def global_mean(x: Any, group: mx.distributed.Group | None = None) -> mx.array:
    group = group or world()[2]
    return global_sum(x, group) / group.size()


def token_loss_scale(local_tokens: Any, group: mx.distributed.Group | None = None) -> mx.array:
    """Denominator that makes averaged token-level gradients exact.

    `loss = (token_loss * mask).sum() / token_loss_scale(mask.sum())` on each rank, then
    `average_gradients`, gives the gradient of `sum(all tokens) / global token count`,
    i.e. exactly the single-process gradient of the union batch. On one process this is
    just the local token count. Compute it outside `value_and_grad`.
    """
    group = group or world()[2]
    total = global_sum(mx.array(local_tokens, dtype=mx.float32), group)
    return mx.maximum(total, 1.0) / group.size()


def average_gradients(grads: Any, group: mx.distributed.Group | None = None,
                      all_reduce_size: int = 32 * 1024 ** 2, weight: Any = None) -> Any:
    """Average a gradient tree over all ranks (identity on one process).

    Small tensors are concatenated into buffers of about `all_reduce_size` bytes so that
    a LoRA adapter's hundreds of tiny matrices cost a few all-reduces, not hundreds
    (mlx.nn.utils.average_gradients, the helper mlx_lm.lora uses). Mixed dtypes fall back
    to one all-reduce per tensor. The result is lazy: evaluate it on every rank (the
    usual `mx.eval(model.parameters(), optimizer.state)` after the update does).

    weight: this rank's share, e.g. its token count when `grads` is the gradient of a
    per-rank *mean* token loss. The result is then sum_r(weight_r * grads_r) / sum_r(weight_r),
    exactly the gradient of the mean over all ranks' tokens (plain averaging is exact only
    when every rank holds the same number of tokens). Lazy, so it works inside mx.compile.
    """
    group = group or world()[2]
    if group.size() == 1:
        return grads
    if weight is not None:
        from mlx.utils import tree_map

        w = mx.array(weight, dtype=mx.float32) if not isinstance(weight, mx.array) else weight
        w = w.astype(mx.float32)
        scale = w * group.size() / mx.maximum(all_sum(w, group), 1e-12)
        grads = tree_map(lambda g: g * scale.astype(g.dtype), grads)
    from mlx.nn.utils import average_gradients as _avg

    # The ring/MPI backends run on the CPU; on a GPU build, the communication stream
    # must be the CPU one.
    return _avg(grads, group=group, all_reduce_size=all_reduce_size,
                communication_stream=mx.cpu)


def broadcast(tree: Any, group: mx.distributed.Group | None = None) -> Any:
    """Rank 0's values of an array tree on every rank (identity on one process).

    Every rank passes a tree of the same structure, shapes and dtypes (e.g. its own
    freshly initialised parameters); the others contribute zeros to an all-sum. Used to
    hand rank 0's checkpoint to ranks whose disk does not hold it. Evaluated now.
    """
    group = group or world()[2]
    if group.size() == 1:
        return tree
    from mlx.utils import tree_map

    main = group.rank() == 0
    out = tree_map(lambda x: all_sum(x if main else mx.zeros_like(x), group), tree)
    mx.eval(out)
    return out


def broadcast_json(obj: Any, group: mx.distributed.Group | None = None) -> Any:
    """Rank 0's JSON-able `obj` on every rank (the others may pass anything, e.g. None)."""
    import json

    import numpy as np

    group = group or world()[2]
    if group.size() == 1:
        return obj
    main = group.rank() == 0
    data = json.dumps(obj, default=_json_scalar).encode() if main else b""
    n = int(global_sum(mx.array(len(data) if main else 0, dtype=mx.int32), group).item())
    arr = (mx.array(np.frombuffer(data, dtype=np.uint8).astype(np.int32)) if main
           else mx.zeros((n,), dtype=mx.int32))
    got = np.array(global_sum(arr, group)).astype(np.uint8).tobytes()
    return json.loads(got.decode())


def _json_scalar(x: Any) -> Any:
    """numpy and mlx scalars as Python numbers (what state.json would hold)."""
    try:
        return x.item()
    except (AttributeError, ValueError, TypeError):
        return str(x)


def broadcast_named(arrays: dict[str, mx.array] | None,
                    group: mx.distributed.Group | None = None) -> dict[str, mx.array]:
    """Rank 0's dict of named arrays on every rank; the others pass None (they need not
    know the names, shapes or dtypes, e.g. an optimizer state they never built)."""
    group = group or world()[2]
    if group.size() == 1:
        return dict(arrays or {})
    main = group.rank() == 0
    spec = broadcast_json({k: [list(v.shape), str(v.dtype).split(".")[-1]]
                           for k, v in (arrays or {}).items()} if main else None, group)
    tree = {k: (arrays[k] if main else mx.zeros(shape, dtype=getattr(mx, dt)))
            for k, (shape, dt) in spec.items()}
    return broadcast(tree, group)


def gather(x: mx.array, group: mx.distributed.Group | None = None) -> mx.array:
    """Every rank's `x` (same shape on all ranks), stacked in rank order: (size, *x.shape).
    Evaluated now; call it on every rank."""
    group = group or world()[2]
    x = mx.array(x) if not isinstance(x, mx.array) else x
    if group.size() == 1:
        return x[None]
    onehot = mx.zeros((group.size(),) + (1,) * x.ndim, dtype=x.dtype)
    onehot[group.rank()] = 1
    return global_sum(onehot * x[None], group)


def gather_rows(x: mx.array, width: int | None = None, fill: Any = 0,
                group: mx.distributed.Group | None = None) -> mx.array:
    """Every rank's rows of `x` in the order `shard` dealt them: row g of the result is row
    g // size of rank g % size's `x` (every rank holds as many rows). `width`: axis 1 is
    first padded with `fill` to this length (e.g. the longest response of any rank).
    Evaluated now; call it on every rank. On one process: `x`, padded."""
    group = group or world()[2]
    x = mx.array(x) if not isinstance(x, mx.array) else x
    if width is not None and width > x.shape[1]:
        x = mx.pad(x, [(0, 0), (0, width - x.shape[1])] + [(0, 0)] * (x.ndim - 2),
                   constant_values=fill)
    if group.size() == 1:
        return x
    if x.dtype == mx.bool_:
        return gather_rows(x.astype(mx.int32), group=group).astype(mx.bool_)
    return gather(x, group).swapaxes(0, 1).reshape(-1, *x.shape[1:])


def barrier(group: mx.distributed.Group | None = None) -> None:
    """Wait until every rank reaches this point (e.g. before reading rank 0's files)."""
    group = group or world()[2]
    if group.size() > 1:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))


@contextlib.contextmanager
def main_only() -> Iterator[bool]:
    """`with main_only() as main: if main: save(...)` followed by a barrier for all ranks."""
    try:
        yield is_main()
    finally:
        barrier()


def on_main(fn: Callable[[], T], share: bool = True,
            group: mx.distributed.Group | None = None) -> T:
    """`fn()` run on rank 0 alone (a quiz, a file write); call it on every rank.

    Every rank returns rank 0's result, sent as JSON (`share=False`: the others get None,
    e.g. for a lock object). When `fn` raises on rank 0, every rank raises: rank 0 the
    exception itself, the others a MindprintError with its message, so no rank waits on a
    collective for one that has failed. On one process this is just `fn()`.
    """
    group = group or world()[2]
    if group.size() == 1:
        return fn()
    main = group.rank() == 0
    result: Any = None
    error: BaseException | None = None
    if main:
        try:
            result = fn()
        except BaseException as e:   # noqa: BLE001 (re-raised below, after telling the others)
            error = e
    msg = broadcast_json(None if not main else (
        {"error": str(error) if isinstance(error, MindprintError) else
         f"{type(error).__name__}: {error}".strip()} if error is not None
        else {"ok": result if share else None}), group)
    if error is not None:
        raise error
    if "error" in msg:
        raise MindprintError(f"rank 0 failed: {msg['error']}")
    return result if main else msg["ok"]


def check_all(fn: Callable[[], Any], group: mx.distributed.Group | None = None) -> None:
    """`fn()` (a check, e.g. that an input exists) run on every rank; when it raises a
    MindprintError on any rank, every rank raises (that rank its own error, the others one
    naming it), e.g. for data that exists on one Mac but not on another. One all-reduce;
    on one process this is just `fn()`."""
    group = group or world()[2]
    if group.size() == 1:
        fn()
        return
    error: MindprintError | None = None
    try:
        fn()
    except MindprintError as e:
        error = e
    bad = [int(x) for x in gather(mx.array(1 if error else 0, dtype=mx.int32), group).tolist()]
    if error is not None:
        raise error
    if any(bad):
        ranks = ", ".join(str(r) for r, b in enumerate(bad) if b)
        raise MindprintError(f"rank {ranks} failed (its message is above)")


_PRIVATE: list[Path] = []


def _private_root() -> Path:
    """This process's own scratch directory (removed when it exits)."""
    if not _PRIVATE:
        import atexit
        import shutil
        import tempfile

        root = Path(tempfile.mkdtemp(prefix=f"mindprint-rank{rank()}-"))
        atexit.register(shutil.rmtree, root, True)
        _PRIVATE.append(root)
    return _PRIVATE[0]


def fetch_dir(path: str | Path, group: mx.distributed.Group | None = None) -> Path:
    """Rank 0's directory `path` (what rank 0 wrote, e.g. an adapter), readable here.

    Rank 0 gets `path` itself; every other rank gets a private copy of its files, sent by
    rank 0 over the collective, so the other ranks need neither a shared disk nor a copy
    of the run directory (and on one machine never read a directory rank 0 may be
    replacing). Call it on every rank; on one process it returns `path`.
    """
    import numpy as np

    group = group or world()[2]
    path = Path(path)
    if group.size() == 1:
        return path
    main = group.rank() == 0
    blobs: list[bytes] = []

    def listing() -> dict:
        if not path.is_dir():
            raise MindprintError(f"{path}: not a directory (rank 0 cannot send it)")
        files = sorted(p for p in path.rglob("*") if p.is_file())
        blobs.extend(p.read_bytes() for p in files)
        return {"names": [p.relative_to(path).as_posix() for p in files],
                "sizes": [len(b) for b in blobs]}

    spec = on_main(listing, group=group)
    total = sum(spec["sizes"])
    if total:
        data = (mx.array(np.frombuffer(b"".join(blobs), dtype=np.uint8)) if main
                else mx.zeros((total,), dtype=mx.uint8))
        data = global_sum(data, group)
    if main:
        return path
    raw = np.array(data).tobytes() if total else b""
    root = _private_root()
    out = root / str(len(list(root.iterdir()))) / path.name     # a fresh copy per fetch
    pos = 0
    for name, n in zip(spec["names"], spec["sizes"]):
        f = out / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(raw[pos:pos + n])
        pos += n
    out.mkdir(parents=True, exist_ok=True)
    return out
