"""One training loop for the LoRA trainers (SFT, the reward model), and the pieces the
trainers share: the adapter being trained, frozen neighbours, gradient checkpointing,
optimizer construction.

`TrainingLoop` has the shape of mlx_lm.tuner.trainer.train: a trainer hands it a loss
`loss(model, *batch) -> (mean loss, weight, *aux means)`, each epoch's batches and how to
turn one into this rank's arrays, and hooks for evaluation and the end of an epoch. The
loop owns the rest: resume (checkpoint format and run fingerprint), the (compiled) step,
gradient accumulation weighted by the loss's weight (tokens, pairs), data-parallel
weighting, clipping, the non-finite and divergence checks, metric lines, progress,
checkpoints and the stop request. Where a run stands is a `TrainState` dataclass, saved
as JSON in every checkpoint; a trainer extends it with its own fields.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from .. import distributed as dist
from ..errors import Interrupted, MindprintError
from ..guards import step_problem, tree_norm
from ..io import append_jsonl, trim_jsonl
from ..models import lora
from ..progress import Progress
from ..stop import stop_now
from .checkpoint import STATE, last_good, read_state_on_main, restore_everywhere, save_checkpoint

log = logging.getLogger(__name__)

LOSS_WINDOW = 8      # optimizer steps averaged by the loss-divergence check
STATE_FORMAT = 2     # of the TrainState record in checkpoints; another one does not resume


# ------------------------------------------------------------------ pure decisions

def plan_steps(per_epoch: int, epochs: int, accumulation: int = 1,
               max_steps: int = 0) -> tuple[int, int]:
    """(micro-batches, optimizer steps) of a run: `epochs` of `per_epoch` micro-batches,
    `accumulation` of them to a step (the last window may be shorter), capped at
    `max_steps` optimizer steps (0: the epochs decide)."""
    total_micro = per_epoch * epochs
    total_steps = -(-total_micro // accumulation)
    if max_steps:
        total_steps = min(total_steps, max_steps)
        total_micro = min(total_micro, total_steps * accumulation)
    return total_micro, total_steps


def epochs_for_min_steps(per_epoch: int, epochs: int, accumulation: int = 1,
                         min_steps: int = 0) -> int:
    """`epochs`, raised until the run takes at least `min_steps` optimizer steps (0: no
    floor): a dataset of a few rows would otherwise end after a handful of steps, most of
    them in warmup and cosine decay."""
    if min_steps <= 0 or per_epoch <= 0:
        return epochs
    # ceil(per_epoch * E / accumulation) >= min_steps  <=>  per_epoch * E > (min_steps - 1) * accumulation
    need = ((min_steps - 1) * accumulation) // per_epoch + 1
    return max(epochs, need)


def rank_share(group: Sequence[int], rank: int, size: int) -> tuple[list[int], int]:
    """This rank's items of a batch (`group[rank::size]`) and how many fillers it adds so
    that every rank holds ceil(len / size): the trainer gives fillers zero weight, so the
    weighted average over ranks stays exact and every rank runs the same collectives."""
    if size == 1:
        return list(group), 0
    mine = list(group)[rank::size]
    return mine, -(-len(group) // size) - len(mine)


def early_stopping(best: float, value: float, bad_epochs: int, patience: int,
                   min_delta: float) -> tuple[bool, int, bool]:
    """(improved, bad epochs, stop): `value` improves on `best` when it is lower by more
    than `min_delta`; `patience` epochs in a row without that stop the run."""
    if value < best - min_delta:
        return True, 0, False
    return False, bad_epochs + 1, bad_epochs + 1 >= patience


def stop_if_requested(role: str, step: int, ckpt_dir: Path, save: Callable[[], None],
                      saved: bool, write: Callable[[str], None]) -> None:
    """The agreed stop after optimizer step `step` (`stop.stop_now`): when any rank asked,
    checkpoint (unless this step just did), say where, and raise `Interrupted`."""
    if not stop_now():
        return
    if not saved:
        save()
    write(f"{role}: stopped at step {step}; checkpoint in {ckpt_dir}")
    raise Interrupted(role, step, ckpt_dir)


def global_norm(tree: Any) -> mx.array:
    """The global L2 norm of a gradient tree (lazy; fp32)."""
    return mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _, g in tree_flatten(tree)))


# ------------------------------------------------------------------ state

@dataclass
class Sums:
    """Weighted sums over a span of optimizer steps (a logging window, an epoch)."""

    weight: float = 0.0   # steps (a window) or items: rows, pairs (an epoch)
    loss: float = 0.0     # sum of loss * weight
    aux: dict[str, float] = field(default_factory=dict)   # the same for the aux values
    tokens: int = 0
    seconds: float = 0.0  # training time (evaluation, hooks and checkpoints excluded)

    def add(self, weight: float, loss: float, aux: Mapping[str, float], tokens: int,
            seconds: float) -> None:
        self.weight += weight
        self.loss += loss * weight
        for k, v in aux.items():
            self.aux[k] = self.aux.get(k, 0.0) + v * weight
        self.tokens += tokens
        self.seconds += seconds

    def mean(self, key: str = "loss") -> float:
        return (self.loss if key == "loss" else self.aux[key]) / self.weight


@dataclass
class TrainState:
    """Where a run stands. Saved (as JSON) in every checkpoint, restored on resume, so a
    resumed run continues with the same bits. Trainers subclass it for their own fields."""

    step: int = 0                 # optimizer steps taken
    micro: int = 0                # micro-batches consumed: the position in the run's data
    done: bool = False            # a hook ended the run early (early stopping)
    train_loss: float | None = None   # mean loss of the last logged window
    loss_window: list[float] = field(default_factory=list)   # the last LOSS_WINDOW step losses
    loss_start: float | None = None   # mean of the first LOSS_WINDOW step losses
    norm_start: float | None = None   # trainable weights' norm before the first step
    best: float = math.inf        # best (lowest) epoch metric so far, for hooks that keep it
    bad_epochs: int = 0           # epochs in a row without improving on `best`
    window: Sums = field(default_factory=Sums)       # since the last metric line
    epoch_sums: Sums = field(default_factory=Sums)   # since the epoch began

    def record(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any], where: Any) -> "TrainState":
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in record]
        if missing:
            raise MindprintError(f"{where}: the checkpoint record has no '{missing[0]}'; delete "
                                 "the checkpoint or run without --resume")
        kw = {n: record[n] for n in names}
        try:
            kw["window"], kw["epoch_sums"] = Sums(**kw["window"]), Sums(**kw["epoch_sums"])
        except TypeError as e:
            raise MindprintError(f"{where}: unreadable checkpoint record ({e})") from None
        return cls(**kw)


# ------------------------------------------------------------------ the loop

@dataclass
class LoopSpec:
    """What a trainer asks of `TrainingLoop` (from its config)."""

    role: str                     # the trainer in error messages and logs: "sft", "reward"
    per_epoch: int                # micro-batches an epoch
    epochs: int
    accumulation: int = 1         # micro-batches per optimizer step
    max_steps: int = 0            # cap on optimizer steps; 0: the epochs decide
    max_grad_norm: float = 0.0    # clip by global norm; 0: no clipping (the norm is logged)
    compile: bool | None = None   # mx.compile the step (see use_compile)
    log_every: int = 1            # optimizer steps between metric lines (one at the end)
    log_per_epoch: bool = False   # count log_every in each epoch's batches; a line at its end
    eval_every: int = 0           # steps between `evaluate` calls; 0: at epoch ends (and the end)
    save_every: int = 0           # steps between checkpoints; 0: none by count (one at the end)
    save_at_epoch_end: bool = False
    aux: Sequence[str] = ()       # names of the loss's aux outputs (weighted means, like it)
    # metric names on a line, in order, for: loss, lr, grad_norm, tokens_per_sec,
    # peak_memory_gb and the aux names; a value without a name is not written
    log_keys: Mapping[str, str] = field(default_factory=dict)
    hint: str = "lower learning_rate or check the data"   # ends a divergence message
    label: str = ""               # the run on the progress bar and in stop messages; "": role

    @property
    def name(self) -> str:
        return self.label or self.role

    def totals(self) -> tuple[int, int]:
        return plan_steps(self.per_epoch, self.epochs, self.accumulation, self.max_steps)


class TrainingLoop:
    """Train `model`'s trainable parameters on `loss` with `optimizer`: `start` (resume or
    a fresh state), then `run`. Rank 0 alone writes checkpoints and metric lines."""

    def __init__(self, model: nn.Module, optimizer: optim.Optimizer, loss: Callable,
                 spec: LoopSpec, ckpt_dir: Path, metrics: Path, fingerprint: str,
                 progress: bool = True):
        self.model, self.optimizer, self.loss, self.spec = model, optimizer, loss, spec
        self.ckpt_dir, self.metrics, self.fingerprint = Path(ckpt_dir), Path(metrics), fingerprint
        self.main = dist.is_main()
        self.history: list[dict] = []       # every metric line this call wrote
        self.bar = Progress(spec.totals()[1], spec.name, enabled=progress and self.main)

    # -- state, files
    def start(self, fresh: TrainState, resume: bool) -> TrainState:
        """The checkpoint's state when `resume` and one is there (rank 0's disk decides;
        its tensors reach every rank), else `fresh` with the optimizer initialised. Metric
        lines after the resumed step are dropped (they are written again)."""
        role, ckpt = self.spec.role, self.ckpt_dir
        saved = read_state_on_main(ckpt, resume)
        if saved is not None:
            if saved.get("format") != STATE_FORMAT:
                raise MindprintError(f"{ckpt}: a checkpoint of another format (written by another "
                                     "version); delete it or run without --resume")
            if saved.get("run_fingerprint") != self.fingerprint:
                raise MindprintError(f"{ckpt}: the checkpoint was written for other data or "
                                     "settings; delete it or run without --resume")
            state = type(fresh).from_record(restore_everywhere(ckpt, self.model, self.optimizer),
                                            ckpt / STATE)
            log.info("%s: resuming at step %d (micro-batch %d of %d)", role, state.step,
                     state.micro, self.spec.totals()[0])
        else:
            if resume:
                log.info("%s: no checkpoint in %s; starting from the beginning", role, ckpt)
            elif ckpt.exists():
                log.info("%s: starting fresh (resume off); %s will be overwritten", role, ckpt)
            self.optimizer.init(self.model.trainable_parameters())
            state = fresh
            if state.norm_start is None:       # for the divergence check
                state.norm_start = tree_norm(self.model.trainable_parameters())
        if self.main:
            trim_jsonl(self.metrics, state.step if saved is not None else None)
        self.bar.n = self.bar.start_n = state.step
        return state

    def checkpoint(self, state: TrainState) -> None:
        if self.main:
            save_checkpoint(self.ckpt_dir, self.model, self.optimizer, {
                **state.record(), "format": STATE_FORMAT, "run_fingerprint": self.fingerprint,
                "total_steps": self.spec.totals()[1]})

    def log(self, record: dict) -> None:
        """One metric line (rank 0 writes it), kept in `history`."""
        if self.main:
            append_jsonl(self.metrics, record)
        self.history.append(record)

    def write(self, message: str) -> None:
        self.bar.write(message)

    # -- the step
    def _step_fn(self) -> Callable:
        model, opt, clip = self.model, self.optimizer, self.spec.max_grad_norm
        loss_and_grad = nn.value_and_grad(model, self.loss)
        world = dist.size()

        def step(batch, prev, do_update):
            # The window's gradient is sum_i(weight_i * grad_i) / sum_i(weight_i): with the
            # tokens as weights, the gradient of the token-mean loss over all its
            # micro-batches (the same as one batch of all their rows).
            (value, weight, *aux), grad = loss_and_grad(model, *batch)
            if world > 1:
                # Weighted by each rank's weight: exactly the gradient of the union batch's mean.
                grad = dist.average_gradients(grad, weight=weight)
                tot = dist.all_sum(mx.stack([value * weight, *(a * weight for a in aux), weight]))
                n = mx.maximum(tot[-1], 1.0)
                value, aux, weight = tot[0] / n, [tot[i] / n for i in range(1, len(aux) + 1)], tot[-1]
            if prev is not None or not do_update:
                # More than one micro-batch in the window (one alone is its own gradient:
                # no scaling by weight / weight, as mlx_lm's trainer without accumulation).
                grad = tree_map(lambda g: g * weight, grad)
                total = weight
                if prev is not None:
                    grad = tree_map(lambda a, b: a + b, grad, prev[0])
                    total = total + prev[1]
                if not do_update:
                    return value, weight, aux, mx.array(0.0), (grad, total)
                grad = tree_map(lambda g: g / mx.maximum(total, 1.0), grad)
            if clip > 0:
                grad, gnorm = optim.clip_grad_norm(grad, clip)
            else:
                gnorm = global_norm(grad)
            opt.update(model, grad)
            return value, weight, aux, gnorm, None

        if use_compile(self.spec.compile):
            cstate = [model.state, opt.state, mx.random.state]
            step = partial(mx.compile, inputs=cstate, outputs=cstate)(step)
        return step

    def _check(self, state: TrainState, loss: float, gnorm: float, epoch: int, batch: int) -> None:
        # Divergence by loss compares means over LOSS_WINDOW steps: single batches differ
        # (a replayed batch the frozen adapters already know starts far lower than a new one).
        window = state.loss_window[-(LOSS_WINDOW - 1):] + [loss]
        state.loss_window = window
        if len(window) == LOSS_WINDOW and state.loss_start is None:
            state.loss_start = sum(window) / LOSS_WINDOW
        problem = step_problem(sum(window) / len(window), gnorm, self.model.trainable_parameters(),
                               state.loss_start, state.norm_start)
        if problem:
            raise problem[0](
                f"{self.spec.role}: {problem[1]} at step {state.step} (epoch {epoch + 1}, batch "
                f"{batch + 1}; loss {loss:.4g}, grad norm {gnorm:.4g}); {last_good(self.ckpt_dir)}; "
                f"{self.spec.hint}")

    def _line(self, state: TrainState, epoch: int, lr: float, gnorm: float) -> dict:
        w = state.window
        values = {"loss": w.mean(), "lr": lr, "grad_norm": gnorm,
                  "tokens_per_sec": w.tokens / max(w.seconds, 1e-9),
                  "peak_memory_gb": mx.get_peak_memory() / 1e9,
                  **{k: w.mean(k) for k in self.spec.aux}}
        return {"step": state.step, "epoch": epoch + 1,
                **{name: values[k] for k, name in self.spec.log_keys.items()}}

    # -- the loop
    def run(self, state: TrainState, batches: Callable[[int], Sequence[Sequence[int]]],
            make_batch: Callable[[Sequence[int]], tuple[tuple, int]],
            evaluate: Callable[[], dict] | None = None,
            on_epoch_end: Callable[[TrainState, int], None] | None = None,
            on_step: Callable[[int, dict], None] | None = None) -> TrainState:
        """Train from `state` to the end (or until a hook sets `state.done`).

        batches(epoch): that epoch's batches (lists of item indices), a pure function of
        the epoch; make_batch(batch): (this rank's loss arguments, the batch's tokens).
        evaluate(): metrics merged into the step's line (eval_every). on_epoch_end(state,
        epochs done): after the step that ends an epoch, before its checkpoint.
        on_step(step, line): after every optimizer step. A stop request checkpoints after
        the current step and raises `Interrupted`.
        """
        spec, model = self.spec, self.model
        total_micro, _ = spec.totals()
        per_epoch, name = spec.per_epoch, spec.name
        step = self._step_fn()
        order_epoch, order = -1, []
        grad, parts, tokens, items = None, [], 0, 0
        window_start, clock = state.micro, time.perf_counter()
        model.train()
        try:
            while state.micro < total_micro and not state.done:
                epoch, b = divmod(state.micro, per_epoch)
                if epoch != order_epoch:
                    order, order_epoch = batches(epoch), epoch
                group = order[b]
                args, n_tok = make_batch(group)
                state.micro += 1
                tokens, items = tokens + n_tok, items + len(group)
                window_end = state.micro - window_start == spec.accumulation or state.micro == total_micro
                value, weight, aux, gnorm, grad = step(args, grad, window_end)
                parts.append((value, weight, aux))
                if not window_end:
                    mx.eval(parts[-1], grad)
                    continue
                mx.eval(parts, gnorm, model.trainable_parameters())
                w_all = sum(w.item() for _, w, _ in parts)
                step_loss = sum(v.item() * w.item() for v, w, _ in parts) / max(w_all, 1.0)
                step_aux = {k: sum(a[i].item() * w.item() for _, w, a in parts) / max(w_all, 1.0)
                            for i, k in enumerate(spec.aux)}
                gn = gnorm.item()
                lr = float(self.optimizer.learning_rate.item())
                state.step += 1
                self._check(state, step_loss, gn, epoch, b)
                seconds = time.perf_counter() - clock
                state.window.add(1.0, step_loss, step_aux, tokens, seconds)
                state.epoch_sums.add(items, step_loss, step_aux, tokens, seconds)
                self.bar.update(1, loss=step_loss, **step_aux, lr=lr)

                last = state.micro == total_micro
                epoch_end = state.micro // per_epoch > window_start // per_epoch
                in_epoch = (state.micro - 1) % per_epoch + 1
                count = in_epoch if spec.log_per_epoch else state.step
                line = None
                if count % spec.log_every == 0 or last or (spec.log_per_epoch and epoch_end):
                    line = self._line(state, epoch, lr, gn)
                    state.train_loss = state.window.mean()
                    self.bar.set_stats({"tok/s": round(state.window.tokens / max(state.window.seconds, 1e-9))})
                    state.window = Sums()
                if evaluate is not None and ((spec.eval_every and state.step % spec.eval_every == 0)
                                             or (not spec.eval_every and epoch_end) or last):
                    line = line or {"step": state.step, "epoch": epoch + 1}
                    got = evaluate()
                    line.update(got)
                    self.write(f"{name} step {state.step}: "
                               + ", ".join(f"{k} {v:.4f}" for k, v in got.items()))
                if line is not None:
                    self.log(line)
                if epoch_end:
                    if on_epoch_end is not None:
                        on_epoch_end(state, state.micro // per_epoch)
                    state.epoch_sums = Sums()
                finished = last or state.done
                saved_now = (spec.save_every and state.step % spec.save_every == 0) or finished \
                    or (spec.save_at_epoch_end and epoch_end)
                if saved_now:
                    self.checkpoint(state)
                if on_step is not None:
                    on_step(state.step, line or {"step": state.step,
                                                 spec.log_keys.get("loss", "loss"): step_loss})
                if not finished:
                    stop_if_requested(name, state.step, self.ckpt_dir, lambda: self.checkpoint(state),
                                      bool(saved_now), self.write)
                grad, parts, tokens, items = None, [], 0, 0
                window_start, clock = state.micro, time.perf_counter()
        finally:
            self.bar.close()
        return state


# ------------------------------------------------------------------ shared pieces

@contextlib.contextmanager
def training_only(model: nn.Module, name: str) -> Iterator[None]:
    """Adapter `name` trainable, every other adapter frozen (but left active as it was)
    for the duration; the others' trainable flags come back afterwards."""
    others = {}
    for _, m in lora.lora_layers(model):
        for n, a in m.adapters.items():
            if n != name:
                others.setdefault(n, a.trainable)
    for n in others:
        lora.set_trainable(model, n, False)
    lora.set_trainable(model, name, True)
    try:
        yield
    finally:
        lora.set_trainable(model, name, False)
        for n, flag in others.items():
            if n in lora.adapter_names(model):
                lora.set_trainable(model, n, flag)


@contextlib.contextmanager
def gradient_checkpointing(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Recompute each decoder layer's activations in the backward pass (mx.checkpoint),
    as mlx_lm.tuner.trainer.grad_checkpoint, but undone when the block ends."""
    layers = getattr(model, "layers", None)
    if not enabled or not layers:
        yield
        return
    cls = type(layers[0])
    original = cls.__call__

    def checkpointed(self, *args, **kwargs):
        def inner(params, *args, **kwargs):
            self.update(params)
            return original(self, *args, **kwargs)

        return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

    cls.__call__ = checkpointed
    try:
        yield
    finally:
        cls.__call__ = original


def use_compile(setting: bool | None) -> bool:
    """mx.compile the step? None: only on a GPU. On the CPU backend a compiled LoRA step
    measured the same speed as the plain one (and the first compile of each shape builds
    C++ kernels, seconds to a minute), so there it is off unless asked for."""
    if setting is not None:
        return bool(setting)
    return mx.default_device().type == mx.gpu


def make_optimizer(learning_rate, weight_decay: float = 0.0, eps: float = 1e-8,
                   bias_correction: bool = True,
                   betas: Sequence[float] = (0.9, 0.999)) -> optim.Optimizer:
    """The trainers' Adam: `torch.optim.Adam` (weight_decay 0) or `torch.optim.AdamW`
    (decoupled weight decay) step for step. mlx's own default is `bias_correction=False`,
    whose first steps are ~3x (step 1) to ~6x (step 30) larger than torch's at the same lr;
    the references' learning rates (TRL, PEFT recipes) assume bias correction."""
    if weight_decay:
        return optim.AdamW(learning_rate=learning_rate, betas=list(betas), eps=eps,
                           weight_decay=weight_decay, bias_correction=bias_correction)
    return optim.Adam(learning_rate=learning_rate, betas=list(betas), eps=eps,
                      bias_correction=bias_correction)


def optimizer_for(cfg, learning_rate) -> optim.Optimizer:
    """`make_optimizer` from a trainer config's `weight_decay` (absent: 0),
    `adam_epsilon` and `adam_bias_correction`."""
    return make_optimizer(learning_rate, weight_decay=getattr(cfg, "weight_decay", 0.0),
                          eps=cfg.adam_epsilon, bias_correction=cfg.adam_bias_correction)


def lora_layer_indices(model: nn.Module, num_layers: int | None) -> list[int] | None:
    """The last `num_layers` decoder layers (mlx-lm's convention); None or <= 0: all."""
    if not num_layers or num_layers <= 0:
        return None
    n = len(lora._layers(model))
    if num_layers > n:
        raise MindprintError(f"num_layers={num_layers} but the model has {n} layers")
    return list(range(n - num_layers, n))
