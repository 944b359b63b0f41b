"""Pieces both trainers share: the adapter being trained, frozen neighbours, gradient
checkpointing, finite-loss checks, optimizer construction."""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from ..errors import Interrupted, MindprintError  # noqa: F401 (Interrupted re-exported)
from ..models import lora

# The Ctrl-C request flag. It lives here (not in pipeline/) so that trainers can poll it
# without importing the pipeline; `pipeline.interrupt` sets and clears this same event.
_STOP = threading.Event()


def stop_requested() -> bool:
    """True once a stop (the pipeline's first Ctrl-C) was requested; trainers poll it
    between optimizer steps, save a checkpoint and raise `Interrupted`."""
    return _STOP.is_set()


def request_stop() -> None:
    _STOP.set()


def clear_stop() -> None:
    _STOP.clear()


def stop_now() -> bool:
    """The stop decision, agreed by every rank (one all-reduce when distributed), so that
    all ranks leave the loop after the same step and none waits on a collective."""
    from .. import distributed as dist

    flag = stop_requested()
    if dist.size() == 1:
        return flag
    return dist.global_sum(mx.array(1.0 if flag else 0.0)).item() > 0


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
