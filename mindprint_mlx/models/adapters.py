"""Adapters on disk in mlx-lm's format, with mindprint's metadata beside them.

An adapter directory is exactly what `mlx_lm.lora` writes (`adapters.safetensors` and
`adapter_config.json`), so `mlx_lm.load(base, adapter_path=dir)` and
`mlx_lm.generate --adapter-path dir` use it unchanged. mindprint's own metadata (base
model, roles, training config, data hash) goes in `mindprint.json`, and scalar heads
(reward, value) in `heads.safetensors`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Mapping

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import MindprintError
from ..guards import check_finite_tensors
from ..io import atomic_dir, load_safetensors, read_json_object
from . import lora
from .heads import ScalarHead

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
METADATA = "mindprint.json"
HEADS = "heads.safetensors"


def _base_metadata(model: nn.Module) -> dict:
    info = getattr(model, "_mindprint_info", None)
    return info.as_metadata() if info is not None else {}


def write_adapter_dir(out: Path, state: Mapping[str, mx.array], settings: dict, n_layers: int,
                      metadata: dict, heads: Mapping[str, ScalarHead] | None = None) -> None:
    """Write the files of one adapter into directory `out` (which must exist)."""
    config = {
        "fine_tune_type": "lora",
        "model": metadata.get("base_model"),
        "num_layers": n_layers - min(settings["layers"]),
        "lora_parameters": {"rank": settings["r"], "scale": settings["alpha"] / settings["r"],
                            "dropout": settings["dropout"], "keys": settings["targets"]},
    }
    mx.save_safetensors(str(out / ADAPTER_WEIGHTS), dict(state), metadata={"format": "mlx"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    meta = {"format_version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "lora_alpha": settings["alpha"], "r": settings["r"], "layers": settings["layers"],
            "targets": settings["targets"], **metadata}
    if heads:
        flat = {}
        for hname, head in heads.items():
            for k, v in tree_flatten(head.parameters()):
                flat[f"{hname}.{k}"] = v
        mx.save_safetensors(str(out / HEADS), flat, metadata={"format": "mlx"})
        meta["heads"] = {h: {"hidden_size": int(head.summary.weight.shape[-1])}
                         for h, head in heads.items()}
    (out / METADATA).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")


def save_adapter(model: nn.Module, name: str, out_dir: str | Path, metadata: dict | None = None,
                 heads: Mapping[str, ScalarHead] | None = None) -> Path:
    """Save adapter `name` (and optional heads) as an mlx-lm adapter directory, atomically."""
    settings = lora.adapter_settings(model, name)
    if not settings["uniform_rank"]:
        raise MindprintError(f"adapter '{name}' has different ranks across layers; "
                             "mlx-lm's adapter format needs one rank")
    n_layers = len(lora._layers(model))
    meta = {**_base_metadata(model), "adapter_name": name, **(metadata or {})}
    state = lora.adapter_state(model, name)
    mx.eval(state)
    out = Path(out_dir)
    check_finite_tensors({**state, **{f"heads.{h}.{k}": v for h, head in (heads or {}).items()
                                      for k, v in tree_flatten(head.parameters())}},
                         f"adapter '{name}' (for {out})")
    with atomic_dir(out) as tmp:
        write_adapter_dir(tmp, state, settings, n_layers, meta, heads)
    return out


def read_adapter_config(adapter_dir: str | Path) -> tuple[dict, dict]:
    """(adapter_config.json, mindprint.json or {}) with clear errors."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise MindprintError(f"adapter directory not found: {d}")
    cfg_file = d / ADAPTER_CONFIG
    if not cfg_file.is_file() or not (d / ADAPTER_WEIGHTS).is_file():
        raise MindprintError(f"{d} is not an mlx-lm adapter directory "
                             f"(needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    cfg = read_json_object(cfg_file)
    if not isinstance(cfg.get("lora_parameters", {}), dict):
        raise MindprintError(f"{cfg_file}: 'lora_parameters' must be a JSON object, got "
                             f"{type(cfg['lora_parameters']).__name__}")
    rank = cfg.get("lora_parameters", {}).get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise MindprintError(f"{cfg_file}: lora_parameters.rank must be a positive integer, "
                             f"got {rank!r}")
    meta = read_json_object(d / METADATA) if (d / METADATA).is_file() else {}
    _check_metadata_types(meta, d / METADATA)
    return cfg, meta


# mindprint.json keys that code reads with a fixed type
_META_TYPES = {"frozen_below": list, "stack": list, "layers": list, "targets": list,
               "heads": dict, "base_model": str, "base_model_path": str,
               "base_model_type": str, "adapter_name": str, "base_quantization": dict}


def _check_metadata_types(meta: dict, where: Path) -> None:
    for key, typ in _META_TYPES.items():
        v = meta.get(key)
        if v is not None and not isinstance(v, typ):
            raise MindprintError(f"{where}: '{key}' must be a JSON "
                                 f"{ {list: 'array', dict: 'object', str: 'string'}[typ]}, "
                                 f"got {type(v).__name__}")


_load_safetensors = load_safetensors


def load_adapter(model: nn.Module, adapter_dir: str | Path, name: str | None = None,
                 trainable: bool = False, enabled: bool = True) -> str:
    """Add the adapter saved in `adapter_dir` to `model` under `name`; returns the name.

    Reads any mlx-lm LoRA adapter directory (mindprint's or `mlx_lm.lora`'s).
    """
    d = Path(adapter_dir)
    cfg, meta = read_adapter_config(d)
    kind = cfg.get("fine_tune_type", "lora")
    if kind != "lora":
        raise MindprintError(f"{d / ADAPTER_CONFIG}: fine_tune_type '{kind}' is not supported "
                             "(only 'lora')")
    params = cfg.get("lora_parameters") or {}
    try:
        r = int(params["rank"])
        scale = float(params.get("scale", 20.0))
        dropout = float(params.get("dropout", 0.0))
        num_layers = int(cfg.get("num_layers", -1))
    except (KeyError, TypeError, ValueError) as e:
        raise MindprintError(f"{d / ADAPTER_CONFIG}: bad lora_parameters ({e!r})") from None
    weights = _load_safetensors(d / ADAPTER_WEIGHTS)
    # A directory name like "sft_adapter.v2" is not a valid adapter name ('.' separates paths).
    name = name or meta.get("adapter_name") or d.resolve().name.replace(".", "_")
    prefix = lora._layer_prefix(model)
    keys = params.get("keys")
    if not keys:
        # mlx-lm's default: every linear layer that the file has weights for.
        keys = sorted({k[len(prefix) + 1:].split(".", 1)[1].rsplit(".", 1)[0]
                       for k in weights if k.startswith(prefix + ".")})
    n = len(lora._layers(model))
    if num_layers < 0 or num_layers > n:
        num_layers = n
    base_fp = meta.get("base_fingerprint")
    info = getattr(model, "_mindprint_info", None)
    if base_fp and info is not None and base_fp != info.fingerprint:
        log.warning("%s was trained on base %s (fingerprint %s); loading onto %s (%s)",
                    d, meta.get("base_model"), base_fp, info.source, info.fingerprint)
    lora.apply_lora(model, name, targets=keys, r=r, alpha=scale * r, dropout=dropout,
                    layers=range(n - num_layers, n), trainable=trainable, enabled=enabled)
    try:
        set_adapter_weights(model, name, weights, source=d / ADAPTER_WEIGHTS)
    except MindprintError:
        lora.remove_adapter(model, name)
        raise
    return name


def set_adapter_weights(model: nn.Module, name: str, weights: Mapping[str, mx.array],
                        source: str | Path = "<weights>") -> None:
    """Assign mlx-lm-named tensors (`...o_proj.lora_a`) to adapter `name`; shapes must match."""
    expected = lora.adapter_state(model, name)
    problems = []
    for k, w in weights.items():
        if k not in expected:
            problems.append(f"{k}: not a LoRA tensor of this model's adapter layout")
        elif tuple(w.shape) != tuple(expected[k].shape):
            problems.append(f"{k}: shape {tuple(w.shape)} in the file, {tuple(expected[k].shape)} "
                            "in the model (is this the adapter's base model?)")
    if problems:
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise MindprintError(f"{source} does not fit this model: " + "; ".join(problems[:3]) + more)
    layers = dict(lora.lora_layers(model))
    for k, w in weights.items():
        path, leaf = k.rsplit(".", 1)
        setattr(layers[path].adapters[name], leaf, w.astype(mx.float32))
    lora._refreeze(model)


def load_heads(adapter_dir: str | Path) -> dict[str, ScalarHead]:
    """The scalar heads saved beside an adapter ({} when there are none)."""
    d = Path(adapter_dir)
    f = d / HEADS
    if not f.is_file():
        return {}
    flat = _load_safetensors(f)
    heads: dict[str, ScalarHead] = {}
    for hname in sorted({k.split(".", 1)[0] for k in flat}):
        own = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith(hname + ".")}
        w, b = own.get("summary.weight"), own.get("summary.bias")
        extra = sorted(set(own) - {"summary.weight", "summary.bias"})
        if w is None:
            raise MindprintError(f"{f}: head '{hname}' has no '{hname}.summary.weight' tensor")
        if extra:
            raise MindprintError(f"{f}: head '{hname}' has unexpected tensor '{hname}.{extra[0]}'")
        if w.ndim != 2 or w.shape[0] != 1 or (b is not None and tuple(b.shape) != (1,)):
            raise MindprintError(f"{f}: head '{hname}' has weight {tuple(w.shape)}"
                                 + (f" and bias {tuple(b.shape)}" if b is not None else "")
                                 + ", not (1, hidden) and (1,)")
        head = ScalarHead(int(w.shape[-1]), bias=b is not None)
        head.load_weights(list(own.items()))
        heads[hname] = head
    return heads


def adapter_metadata(adapter_dir: str | Path) -> dict:
    return read_adapter_config(adapter_dir)[1]
