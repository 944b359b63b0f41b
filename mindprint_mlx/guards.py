"""Guards against silent failure: non-finite numbers and tensors, diverged training, a reward
model at chance, LoRA settings that do not fit the model, a model reference that names
nothing. Pure decisions (each returns what is wrong, or raises a one-line error); the
trainers and the pipeline call them.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlx.core as mx
from mlx.utils import tree_flatten

from .errors import MindprintError


class NonFiniteError(MindprintError):
    """A loss, gradient, KL, score or tensor became NaN or infinite."""


class DivergedError(MindprintError):
    """Training stayed finite but ran away (loss far above its start, weights exploding)."""


# ------------------------------------------------------------------ numbers and tensors

def first_nonfinite(values: Mapping[str, Any]) -> tuple[str, float] | None:
    """The first (name, value) of `values` that is NaN or infinite (None values are skipped)."""
    for k, v in values.items():
        if v is None:
            continue
        f = float(v)
        if not math.isfinite(f):
            return k, f
    return None


def nonfinite_tensors(tree: Any) -> list[str]:
    """Names of the tensors in `tree` (a dict/list tree of arrays) holding NaN or inf."""
    flat = [(k, v) for k, v in tree_flatten(tree) if isinstance(v, mx.array)]
    if not flat:
        return []
    flags = mx.stack([mx.all(mx.isfinite(v)) if mx.issubdtype(v.dtype, mx.floating)
                      else mx.array(True) for _, v in flat])
    ok = flags.tolist()
    return [k for (k, _), good in zip(flat, ok) if not good]


def check_finite_tensors(tree: Any, what: str) -> None:
    """Refuse to save, merge or fold `what` when any of its tensors is NaN or infinite."""
    bad = nonfinite_tensors(tree)
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise NonFiniteError(f"{what}: tensor {bad[0]}{more} is not finite (NaN or inf); "
                             "refusing to write or combine it")


def tree_norm(tree: Any) -> float:
    """Global L2 norm of the floating tensors of `tree`."""
    vals = [v for _, v in tree_flatten(tree) if isinstance(v, mx.array)]
    if not vals:
        return 0.0
    return float(mx.sqrt(sum((v.astype(mx.float32) ** 2).sum() for v in vals)).item())


# ------------------------------------------------------------------ divergence

LOSS_RISE = 3.0       # loss this many times its start (and LOSS_MARGIN above it): diverged
LOSS_MARGIN = 2.0
NORM_GROWTH = 1000.0  # trainable weights' norm this many times the initial one: diverged


def divergence(loss_start: float | None, loss_now: float | None, norm_start: float | None,
               norm_now: float | None) -> str | None:
    """Why a finite run counts as diverged, or None. Loss: above LOSS_RISE x its start and
    LOSS_MARGIN above it (noise on a tiny batch does neither); weights: their norm grew
    NORM_GROWTH-fold (Adam moves each weight by at most about lr per step: at sane learning
    rates a LoRA adapter's norm grows by a small factor over a whole run)."""
    if loss_start is not None and loss_now is not None and loss_start > 0 and \
            loss_now > LOSS_RISE * loss_start and loss_now > loss_start + LOSS_MARGIN:
        return f"loss {loss_now:.4g} is far above its start {loss_start:.4g}"
    if norm_start is not None and norm_now is not None and norm_start > 0 and \
            norm_now > NORM_GROWTH * norm_start:
        return f"the trainable weights' norm grew from {norm_start:.4g} to {norm_now:.4g}"
    return None


def step_problem(loss: float, grad_norm: float, params: Any, loss_start: float | None,
                 norm_start: float | None) -> tuple[type, str] | None:
    """What is wrong after an optimizer step, as (error class, text), or None: a non-finite
    loss, gradient norm or trainable weight, or a finite run that diverged."""
    bad = first_nonfinite({"loss": loss, "gradient norm": grad_norm})
    if bad:
        return NonFiniteError, f"the {bad[0]} became {bad[1]}"
    tensors = nonfinite_tensors(params)
    if tensors:
        return NonFiniteError, f"the weights became non-finite ({tensors[0]})"
    why = divergence(loss_start, loss, norm_start, tree_norm(params))
    if why:
        return DivergedError, f"training diverged ({why})"
    return None


# ------------------------------------------------------------------ reward model

CHANCE_ACCURACY = 0.5


def reward_at_chance(val_accuracy: float | None) -> bool:
    """A reward model no better than a coin on its held-out pairs (or with no number)."""
    return val_accuracy is None or not math.isfinite(float(val_accuracy)) or \
        float(val_accuracy) <= CHANCE_ACCURACY


# ------------------------------------------------------------------ LoRA settings vs the model

def check_lora_fits(model: Any, section: str, targets: Any, num_layers: Any) -> None:
    """`section`'s lora_targets name linear layers of every decoder layer it covers and
    num_layers is at most the model's layer count (checked before anything trains)."""
    from .models import lora

    layers = lora._layers(model)
    n = int(num_layers or 0)
    if n < 0 or n > len(layers):
        raise MindprintError(f"{section}.num_layers={n}, but the model has {len(layers)} decoder "
                             "layers (0: all)")
    if targets is None:
        return
    targets = list(targets)
    if not targets:
        raise MindprintError(f"{section}.lora_targets is empty: name at least one linear layer")
    for layer in layers[len(layers) - n if n else 0:]:
        try:
            lora._resolve_targets(layer, targets)
        except MindprintError as e:
            raise MindprintError(f"{section}.lora_targets: {e}") from None


# ------------------------------------------------------------------ the model reference

def check_model_ref(model: str) -> None:
    """The model is an existing directory, or looks like a hub id (`org/name`) whose first
    part is not a local directory (then it was meant as a path, and is mistyped)."""
    s = str(model)
    p = Path(s).expanduser()
    if p.exists():
        if not p.is_dir():
            raise MindprintError(f"model {s}: is a file; expected a model directory "
                                 "(config.json + *.safetensors) or a hub id")
        if not (p / "config.json").is_file():
            raise MindprintError(f"model {s}: the directory has no config.json (not a model directory)")
        return
    from .models.load import looks_like_hub_id

    if looks_like_hub_id(s) and not Path(s.split("/")[0]).is_dir():
        return
    parent = p.parent
    near = ""
    if parent.is_dir():
        import difflib

        names = sorted(x.name for x in parent.iterdir() if x.is_dir())
        close = difflib.get_close_matches(p.name, names, n=1)
        near = f" (did you mean {parent / close[0]}?)" if close else ""
    raise MindprintError(f"model {s}: no such directory{near}, and not a hub id (org/name)")


# ------------------------------------------------------------------ seeded initialisation

@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw from mx.random seeded with `seed` inside the block; the global random state
    comes back afterwards (what was drawn before is unaffected by what is drawn inside)."""
    hi, lo = (int(x) for x in mx.random.state[0].tolist())
    mx.random.seed(int(seed))
    try:
        yield
    finally:
        mx.random.seed((hi << 32) | lo)
