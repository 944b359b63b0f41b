"""Multi-adapter LoRA over mlx-lm models.

One base in memory, many roles: a `MultiLoRALinear` wraps a `nn.Linear` or
`nn.QuantizedLinear` and holds several named LoRA adapters (each with its own rank,
alpha, dropout, trainable flag). Which adapters take part in the forward pass is a
per-layer active set, switched with `active_adapters(model, [...])` without copying a
single weight. Semantics are PEFT's: y = W x + (alpha / r) * B A x, A Kaiming-uniform,
B zero. Parameter names keep mlx-lm's layout (`...o_proj.linear.weight`), and an
adapter's own tensors are `...o_proj.adapters.<name>.lora_a` (in, r) and `.lora_b` (r, out),
so saving one adapter as an mlx-lm adapter file is a rename.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import MindprintError

DEFAULT_TARGETS = ("o_proj", "v_proj", "up_proj", "down_proj")


class LoRAAdapter(nn.Module):
    """The low-rank pair of one adapter on one linear layer."""

    def __init__(self, input_dims: int, output_dims: int, r: int = 1, alpha: float = 1.0,
                 dropout: float = 0.0, trainable: bool = True):
        super().__init__()
        if r < 1:
            raise MindprintError(f"LoRA rank must be >= 1, got {r}")
        self.r = int(r)
        self.alpha = float(alpha)
        self.scale = self.alpha / self.r
        self.dropout_p = float(dropout)
        self.trainable = bool(trainable)
        # Kaiming-uniform with a=sqrt(5), as torch.nn.Linear and PEFT: bound = 1/sqrt(fan_in).
        bound = 1.0 / math.sqrt(input_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (input_dims, self.r))
        self.lora_b = mx.zeros((self.r, output_dims))
        self.dropout = nn.Dropout(p=self.dropout_p) if self.dropout_p > 0 else None

    def __call__(self, x: mx.array) -> mx.array:
        if self.dropout is not None:
            x = self.dropout(x)
        return self.scale * ((x @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype))

    def delta_weight(self) -> mx.array:
        """scale * B A in the base layer's (out, in) layout, float32."""
        return self.scale * (self.lora_a.astype(mx.float32) @ self.lora_b.astype(mx.float32)).T


def _linear_dims(linear: nn.Module) -> tuple[int, int]:
    out_dims, in_dims = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        in_dims = in_dims * 32 // linear.bits
    return in_dims, out_dims


class MultiLoRALinear(nn.Module):
    """A linear layer plus named adapters; only the active ones add their update."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear
        self.adapters = {}
        self.active = frozenset()

    @property
    def dims(self) -> tuple[int, int]:
        return _linear_dims(self.linear)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        for name, adapter in self.adapters.items():
            if name in self.active:
                y = y + adapter(x).astype(y.dtype)
        return y

    def add(self, name: str, adapter: LoRAAdapter, enabled: bool = True) -> None:
        self.adapters[name] = adapter
        if enabled:
            self.active = self.active | {name}

    def merged_linear(self, names: Iterable[str], dequantize: bool = False) -> nn.Module:
        """The base layer with `names` folded into its weights."""
        lin = self.linear
        quantized = isinstance(lin, nn.QuantizedLinear)
        if quantized:
            w = mx.dequantize(lin.weight, lin.scales, lin.biases, group_size=lin.group_size,
                              bits=lin.bits, mode=getattr(lin, "mode", "affine"))
        else:
            w = lin.weight
        dtype = w.dtype
        w = w.astype(mx.float32)
        for n in names:
            w = w + self.adapters[n].delta_weight()
        in_dims, out_dims = _linear_dims(lin)
        new = nn.Linear(in_dims, out_dims, bias="bias" in lin)
        new.weight = w.astype(dtype)
        if "bias" in lin:
            new.bias = lin.bias
        if quantized and not dequantize:
            new = nn.QuantizedLinear.from_linear(new, lin.group_size, lin.bits,
                                                 mode=getattr(lin, "mode", "affine"))
        return new


def _layers(model: nn.Module) -> list[nn.Module]:
    layers = getattr(model, "layers", None)
    if layers is None:
        raise MindprintError(f"{type(model).__module__}: model exposes no `.layers`; "
                             "cannot place LoRA adapters")
    return list(layers)


def _layer_prefix(model: nn.Module) -> str:
    """Path of the decoder layer list in the model's parameter tree (mlx-lm: model.layers)."""
    first = _layers(model)[0]
    for path, m in model.named_modules():
        if m is first:
            return path.rsplit(".", 1)[0]
    raise MindprintError("could not locate the decoder layers in the model")


def _resolve_targets(layer: nn.Module, targets: Sequence[str]) -> dict[str, nn.Module]:
    """Map each target (a module name like 'o_proj' or a path like 'self_attn.o_proj')
    to the linear modules of `layer` it names."""
    candidates = {}
    for path, m in layer.named_modules():
        if isinstance(m, MultiLoRALinear):
            candidates[path] = m
        elif isinstance(m, (nn.Linear, nn.QuantizedLinear)) and not path.endswith(".linear") \
                and ".adapters." not in path and path != "linear":
            candidates[path] = m
    found: dict[str, nn.Module] = {}
    for t in targets:
        hits = {p: m for p, m in candidates.items() if p == t or p.endswith("." + t)}
        if not hits:
            raise MindprintError(
                f"LoRA target '{t}' matches no linear layer; the layers have: "
                f"{', '.join(sorted(set(p.split('.')[-1] for p in candidates)))} "
                f"(full paths: {', '.join(sorted(candidates))})")
        found.update(hits)
    return found


def apply_lora(model: nn.Module, name: str, targets: Sequence[str] = DEFAULT_TARGETS,
               r: int = 1, alpha: float = 1.0, dropout: float = 0.0,
               layers: Sequence[int] | None = None, trainable: bool = True,
               enabled: bool = True) -> list[str]:
    """Add adapter `name` to the `targets` of the given decoder `layers` (all by default).

    Freezes the base: afterwards `model.trainable_parameters()` holds exactly the
    trainable adapters' tensors. Returns the module paths that received the adapter.
    """
    if not name or "." in name:
        raise MindprintError(f"adapter name must be non-empty and contain no '.', got {name!r}")
    if name in adapter_names(model):
        raise MindprintError(f"model already has an adapter named '{name}'")
    all_layers = _layers(model)
    idx = range(len(all_layers)) if layers is None else list(layers)
    for i in idx:
        if not -len(all_layers) <= i < len(all_layers):
            raise MindprintError(f"layer index {i} out of range (model has {len(all_layers)} layers)")
    prefix = _layer_prefix(model)
    placed = []
    for i in idx:
        i = i % len(all_layers)
        layer = all_layers[i]
        for path, m in _resolve_targets(layer, targets).items():
            if not isinstance(m, MultiLoRALinear):
                wrapped = MultiLoRALinear(m)
                _set_submodule(layer, path, wrapped)
                m = wrapped
            in_dims, out_dims = m.dims
            adapter = LoRAAdapter(in_dims, out_dims, r=r, alpha=alpha, dropout=dropout,
                                  trainable=trainable)
            # A new module starts in training mode; follow the model's mode so dropout
            # stays off for a model in eval mode (as `load` returns it).
            adapter.train(model.training)
            m.add(name, adapter, enabled=enabled)
            placed.append(f"{prefix}.{i}.{path}")
    _refreeze(model)
    return placed


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parts = path.split(".")
    parent = root
    for p in parts[:-1]:
        parent = parent[int(p)] if isinstance(parent, list) else getattr(parent, p)
    if isinstance(parent, list):
        parent[int(parts[-1])] = module
    else:
        setattr(parent, parts[-1], module)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, MultiLoRALinear]]:
    for path, m in model.named_modules():
        if isinstance(m, MultiLoRALinear):
            yield path, m


def adapter_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for _, m in lora_layers(model):
        names.update(dict.fromkeys(m.adapters))
    return list(names)


def _check_names(model: nn.Module, names: Iterable[str]) -> list[str]:
    names = list(names)
    known = adapter_names(model)
    for n in names:
        if n not in known:
            raise MindprintError(f"no adapter named '{n}'; the model has: {', '.join(known) or 'none'}")
    return names


def _refreeze(model: nn.Module) -> None:
    """Base frozen; each adapter trainable or not by its own flag."""
    model.freeze()
    for _, m in lora_layers(model):
        for adapter in m.adapters.values():
            if adapter.trainable:
                adapter.unfreeze()


def set_trainable(model: nn.Module, name: str, trainable: bool) -> None:
    _check_names(model, [name])
    for _, m in lora_layers(model):
        if name in m.adapters:
            m.adapters[name].trainable = trainable
    _refreeze(model)


def get_active(model: nn.Module) -> dict[str, frozenset]:
    return {path: m.active for path, m in lora_layers(model)}


def set_active(model: nn.Module, names: Iterable[str]) -> None:
    """Enable exactly `names` in every LoRA layer (an empty list gives the base model)."""
    names = frozenset(_check_names(model, names))
    for _, m in lora_layers(model):
        m.active = names & frozenset(m.adapters)


@contextlib.contextmanager
def active_adapters(model: nn.Module, names: Iterable[str]) -> Iterator[nn.Module]:
    """`with active_adapters(model, ["sft"]): ...` runs the model as base + sft only."""
    saved = get_active(model)
    set_active(model, names)
    try:
        yield model
    finally:
        for path, m in lora_layers(model):
            m.active = saved.get(path, frozenset())


def adapter_state(model: nn.Module, name: str) -> dict[str, mx.array]:
    """Adapter `name`'s tensors under mlx-lm's names (`...o_proj.lora_a`)."""
    _check_names(model, [name])
    out = {}
    for path, m in lora_layers(model):
        if name in m.adapters:
            out[f"{path}.lora_a"] = m.adapters[name].lora_a
            out[f"{path}.lora_b"] = m.adapters[name].lora_b
    return out


def adapter_settings(model: nn.Module, name: str) -> dict:
    """Rank, alpha, dropout, targets (paths within a layer) and layer indices of `name`."""
    _check_names(model, [name])
    prefix = _layer_prefix(model)
    layers, keys, ranks, alphas, drops = set(), set(), set(), set(), set()
    for path, m in lora_layers(model):
        if name not in m.adapters:
            continue
        rest = path[len(prefix) + 1:]
        i, key = rest.split(".", 1)
        layers.add(int(i))
        keys.add(key)
        a = m.adapters[name]
        ranks.add(a.r)
        alphas.add(a.alpha)
        drops.add(a.dropout_p)
    return {"r": max(ranks), "alpha": max(alphas), "dropout": max(drops),
            "uniform_rank": len(ranks) == 1 and len(alphas) == 1,
            "targets": sorted(keys), "layers": sorted(layers)}


def remove_adapter(model: nn.Module, name: str) -> None:
    _check_names(model, [name])
    for _, m in lora_layers(model):
        if name in m.adapters:
            del m.adapters[name]
            m.active = m.active - {name}


def merge(model: nn.Module, names: Iterable[str], dequantize: bool = False) -> None:
    """Fold adapters `names` into the base weights and remove them.

    A quantized base is dequantized, updated and quantized again (lossy), or left in
    full precision with `dequantize=True`.
    """
    names = _check_names(model, names)
    for _, m in lora_layers(model):
        present = [n for n in names if n in m.adapters]
        if not present:
            continue
        m.linear = m.merged_linear(present, dequantize=dequantize)
        for n in present:
            del m.adapters[n]
        m.active = m.active - set(present)
    _refreeze(model)


def combine_adapters(model: nn.Module, names: Sequence[str], new_name: str,
                     trainable: bool = False, enabled: bool = True) -> None:
    """Replace adapters `names` by one adapter `new_name` with the same effect, exactly.

    Ranks concatenate: A = [A_1 .. A_k] (in, sum r), B = [s_1 B_1; ..; s_k B_k] (sum r, out),
    scale 1 (alpha = sum r). A layer that lacks some of them gets only the ones it has; a
    layer with none keeps nothing.
    """
    names = _check_names(model, names)
    if new_name in adapter_names(model) and new_name not in names:
        raise MindprintError(f"model already has an adapter named '{new_name}'")
    from ..guards import check_finite_tensors

    for n in names:   # a NaN adapter folded in would poison every later topic and unit
        check_finite_tensors(adapter_state(model, n), f"adapter '{n}'")
    for _, m in lora_layers(model):
        present = [m.adapters[n] for n in names if n in m.adapters]
        if not present:
            continue
        in_dims, out_dims = m.dims
        rank = sum(a.r for a in present)
        combined = LoRAAdapter(in_dims, out_dims, r=rank, alpha=float(rank), trainable=trainable)
        combined.train(model.training)
        combined.lora_a = mx.concatenate([a.lora_a.astype(mx.float32) for a in present], axis=1)
        combined.lora_b = mx.concatenate([a.scale * a.lora_b.astype(mx.float32) for a in present], axis=0)
        for n in names:
            m.adapters.pop(n, None)
        m.active = m.active - set(names)
        m.add(new_name, combined, enabled=enabled)
    _refreeze(model)


def unwrap(model: nn.Module) -> None:
    """Replace LoRA layers that hold no adapters by their plain base layer."""
    for path, m in list(lora_layers(model)):
        if not m.adapters:
            _set_submodule(model, path, m.linear)


def trainable_count(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
