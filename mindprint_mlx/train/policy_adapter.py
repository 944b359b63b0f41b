"""What the adapter-on-a-frozen-reference trainers (DPO, DITTO, GRPO, RLOO) share.

Roles are adapter sets on ONE base in memory: reference = the frozen adapters (e.g.
"sft"), policy = those plus one trainable adapter. Switching the trainable adapter off
gives the reference exactly, so no second copy of the model is ever made.

Also here: the seeded init of that adapter, prompt encoding, per-step RNG keys,
weighted gradient accumulation, and the step loop with checkpoints, metrics JSONL,
progress, divergence and stop handling.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from .. import distributed as dist
from ..errors import MindprintError
from ..guards import DivergedError, NonFiniteError, divergence, first_nonfinite, seeded, tree_norm
from ..io import append_jsonl, trim_jsonl
from ..models import lora
from ..progress import Progress
from .checkpoint import last_good, read_state_on_main, restore_everywhere, save_checkpoint
from .loop import global_norm, stop_if_requested

log = logging.getLogger(__name__)


def base_weight_bytes(model: nn.Module) -> int:
    """Bytes of the base model's own weights (LoRA adapters excluded)."""
    return sum(v.nbytes for k, v in tree_flatten(model.parameters()) if ".adapters." not in k)


def encode_prompts(tokenizer, prompts: Sequence[Any]) -> list[list[int]]:
    """Chat messages, plain strings (one user turn) or token lists -> prompt token lists."""
    from ..data.batching import as_messages, encode_prompt

    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (list, tuple)) and p and isinstance(p[0], (int, np.integer)):
            out.append([int(t) for t in p])
            continue
        ids = encode_prompt(tokenizer, as_messages(p))
        if not ids:
            raise MindprintError(f"prompt {i} encodes to no tokens")
        out.append(ids)
    return out


def cycled_indices(n: int, step: int, batch_size: int, seed: int, salt: int) -> list[int]:
    """The items of `step`: a seeded permutation per pass over the n items, cycled."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        out.append(int(np.random.default_rng([seed, epoch, salt]).permutation(n)[i]))
    return out


def step_key(seed: int, step: int, salt: int) -> mx.array:
    return mx.random.key(int(np.random.default_rng([seed, step, salt]).integers(0, 2 ** 62)))


def init_seed(seed: int, salt: int) -> int:
    """The adapter init's seed: from `seed` but not `seed` itself (SFT used that one)."""
    return int(np.random.default_rng([seed, salt]).integers(0, 2 ** 62))


def add_policy_adapter(model: nn.Module, cfg, frozen_adapters: Sequence[str], role: str,
                       salt: int) -> tuple[list[str], list[str]]:
    """Check the adapters, freeze every existing one, add cfg.adapter_name (trainable,
    inactive, seeded init) on cfg.lora_targets of the last cfg.num_layers layers, and
    put the model in eval mode (dropout off). Returns (reference, policy) adapter lists."""
    from ..ppo.reward_norm import check_declared_adapters

    known = lora.adapter_names(model)
    missing = [a for a in frozen_adapters if a not in known]
    if missing:
        raise MindprintError(f"{role}: frozen adapter(s) {', '.join(missing)} not in the model "
                             f"(it has: {', '.join(known) or 'none'})")
    if cfg.adapter_name in frozen_adapters:
        raise MindprintError(f"{role}: adapter '{cfg.adapter_name}' cannot be both frozen and trained")
    if cfg.adapter_name in known:
        raise MindprintError(f"{role}: the model already has an adapter named '{cfg.adapter_name}'; "
                             "merge or remove it first, or set adapter_name")
    try:
        check_declared_adapters(model, frozen_adapters)
    except MindprintError as e:
        raise MindprintError(f"{role}: {str(e).removeprefix('PPO: ')}") from None
    for a in known:
        lora.set_trainable(model, a, False)
    n_layers = len(lora._layers(model))
    if cfg.num_layers > n_layers:
        raise MindprintError(f"{role}: num_layers={cfg.num_layers} but the model has {n_layers} layers")
    layers = range(n_layers - cfg.num_layers, n_layers) if cfg.num_layers else None
    with seeded(init_seed(cfg.seed, salt)):
        lora.apply_lora(model, cfg.adapter_name, targets=cfg.lora_targets, r=cfg.lora_rank,
                        alpha=cfg.lora_alpha, layers=layers, trainable=True, enabled=False)
    model.eval()
    check_only_adapter_trains(model, cfg.adapter_name, role)
    reference = list(frozen_adapters)
    return reference, reference + [cfg.adapter_name]


class PolicyTrainer:
    """The state every trainer of one LoRA policy adapter over frozen reference adapters
    holds (DPO, DITTO, GRPO, RLOO): the adapter (`add_policy_adapter`, seeded by `salt`),
    its optimizer, its starting norm (for the divergence guard), the base's weight bytes,
    the EOS set and pad id, the step, the history and value_and_grad of `self._loss`.
    `role` names the method in errors and metrics."""

    role = "policy"

    def __init__(self, model: nn.Module, tokenizer, cfg, frozen_adapters: Sequence[str], salt: int):
        from ..data.batching import eos_ids, pad_id
        from .loop import optimizer_for

        cfg.validate()
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.reference_adapters, self.policy_adapters = add_policy_adapter(
            model, cfg, frozen_adapters, self.role, salt)
        self.norm_start = adapter_norm(model, cfg.adapter_name)
        self.optimizer = optimizer_for(cfg, cfg.learning_rate)
        self.base_bytes = base_weight_bytes(model)
        self.eos_ids, self.pad_id = eos_ids(tokenizer), pad_id(tokenizer)
        self.step = 0
        self.history: list[dict] = []
        self._loss_and_grad = nn.value_and_grad(model, self._loss)

    def _loss(self, model: nn.Module, batch: Any):
        raise NotImplementedError


def take_rows(batch: Any, idx: Any) -> Any:
    """The rows `idx` of every array field of the dataclass `batch`, as a batch of its type."""
    ix = mx.array(np.asarray(idx).astype(np.int32))
    return type(batch)(*(mx.take(getattr(batch, f), ix, axis=0) for f in batch.__dataclass_fields__))


def check_only_adapter_trains(model: nn.Module, name: str, role: str) -> None:
    keys = [k for k, _ in tree_flatten(model.trainable_parameters())]
    stray = [k for k in keys if f".adapters.{name}." not in k]
    if stray:
        raise MindprintError(f"{role} would also train {len(stray)} tensors outside the '{name}' "
                             f"adapter (first: {stray[0]}); load other adapters frozen")
    if not keys:
        raise MindprintError(f"{role}: the '{name}' adapter has no trainable tensors")


def accumulate(loss_and_grad: Callable, model: nn.Module, parts: Sequence[Any],
               weights: Sequence[float]) -> tuple[Any, dict]:
    """sum_i w_i * grad_i and sum_i w_i * stats_i over micro-batches `parts`; each
    loss_and_grad(model, part) returns ((loss, stats), grads)."""
    grads, stats = None, None
    for part, w in zip(parts, weights):
        (_, st), g = loss_and_grad(model, part)
        g = tree_map(lambda x: x * w, g)
        st = {k: v * w for k, v in st.items()}
        grads = g if grads is None else tree_map(mx.add, grads, g)
        stats = st if stats is None else {k: stats[k] + st[k] for k in stats}
        mx.eval(grads, stats)
    return grads, stats


def apply_update(model: nn.Module, optimizer: optim.Optimizer, grads: Any, stats: dict,
                 max_grad_norm: float | None, role: str, step: int,
                 sum_over_ranks: bool = False, weight: Any = None) -> dict:
    """Average (or, with `sum_over_ranks`, sum) gradients and stats over ranks, clip,
    refuse a non-finite loss or gradient, and step. Returns float stats + grad_norm."""
    n = dist.size()
    if n > 1:
        grads = dist.average_gradients(grads, weight=weight)
        if sum_over_ranks:
            grads = tree_map(lambda g: g * n, grads)
        keys = sorted(stats)
        vals = dist.global_mean(mx.stack([mx.array(stats[k]).astype(mx.float32) for k in keys]))
        stats = dict(zip(keys, vals.tolist()))
    stats = {k: float(v) for k, v in stats.items()}
    if max_grad_norm is None:
        norm = global_norm(grads)
    else:
        grads, norm = optim.clip_grad_norm(grads, max_grad_norm)
    stats["grad_norm"] = float(norm)
    bad = first_nonfinite({"loss": stats.get("loss"), "gradient norm": stats["grad_norm"]})
    if bad:
        raise NonFiniteError(f"{role}: the {bad[0]} became {bad[1]} at step {step + 1}")
    optimizer.update(model, grads)
    mx.eval(model.trainable_parameters(), optimizer.state)
    return stats


def memory_stats(prefix: str, base_bytes: int) -> dict:
    peak = int(mx.get_peak_memory())
    return {f"{prefix}/memory/peak_bytes": peak, f"{prefix}/memory/base_weight_bytes": base_bytes,
            f"{prefix}/memory/peak_over_base": peak / max(base_bytes, 1)}


def restore_or_start(ckpt: Path, metrics: Path, model: nn.Module, optimizer: optim.Optimizer,
                     resume: bool, role: str) -> dict | None:
    """Resume from `ckpt` when asked and it holds a complete checkpoint (rank 0's disk
    decides; its tensors reach every rank), keeping metrics lines up to its step; else a
    fresh metrics file. Returns the checkpoint's state record or None."""
    state = read_state_on_main(ckpt, resume)
    if state is not None:
        if state.get("role") != role:
            raise MindprintError(f"{ckpt}: a {state.get('role')!r} checkpoint, not a {role} one")
        state = restore_everywhere(ckpt, model, optimizer)
        if dist.is_main():
            trim_jsonl(metrics, int(state["step"]))
        log.info("resuming %s from step %d (%s)", role, state["step"], ckpt)
    elif dist.is_main():
        trim_jsonl(metrics, None)
    return state


def run_steps(role: str, total: int, start: int, do_step: Callable[[int], dict],
              save: Callable[[], None], ckpt: Path, metrics: Path, save_every: int,
              progress: bool, norm_start: float, adapter_norm: Callable[[], float],
              history: list, on_step: Callable[[int, dict], None] | None = None,
              bar_keys: Sequence[str] = (), hint: str = "lower learning_rate") -> None:
    """Steps start..total-1: do_step(step) -> stats; then metrics, progress, divergence
    checks, periodic checkpoints, the agreed stop (checkpoint, then `Interrupted`), and a
    final checkpoint."""
    main = dist.is_main()
    bar = Progress(total, role, enabled=progress and main, initial=start)
    try:
        for step in range(start, total):
            try:
                stats = do_step(step)
                why = divergence(None, None, norm_start, adapter_norm())
                if why:
                    raise DivergedError(f"{role}: diverged at step {step + 1}: {why}")
            except (NonFiniteError, DivergedError) as e:
                raise type(e)(f"{e}; {last_good(ckpt)} ({hint})") from None
            record = {"step": step + 1, **stats}
            history.append(record)
            if main:
                append_jsonl(metrics, record)
            if on_step is not None:
                on_step(step + 1, record)
            bar.update(1, **{k.rsplit("/", 1)[-1]: stats[k] for k in bar_keys if k in stats})
            done = step + 1
            saved_now = save_every and done % save_every == 0
            if saved_now and done < total and main:
                save()
            if done < total:
                stop_if_requested(role, done, ckpt, save if main else (lambda: None),
                                  bool(saved_now), bar.write)
        if main:
            save()
    finally:
        bar.close()


def finish(model: nn.Module, name: str, saved_active: dict) -> None:
    """Afterwards the model keeps the trained adapter, frozen and inactive."""
    lora.set_trainable(model, name, False)
    for path, m in lora.lora_layers(model):
        m.active = saved_active.get(path, frozenset())


def checkpoint(ckpt: Path, model: nn.Module, optimizer: optim.Optimizer, state: dict) -> None:
    save_checkpoint(ckpt, model, optimizer, state)


def adapter_norm(model: nn.Module, name: str) -> float:
    return tree_norm(lora.adapter_state(model, name))
