"""Fold an adapter into its base and write a full Hugging Face checkpoint.

For a full-precision base the checkpoint's own safetensors files are rewritten with
`W + scale * (a b).T` in the LoRA'd weights and every other tensor (and the shard
layout, index, config, tokenizer files) kept as is, so anything transformers could load
before it loads now. An MLX-quantized base (mlx-community checkpoints) cannot be read
by transformers: with `dequantize=True` it is loaded, fused and written in full
precision; without it, fusing is refused.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import MindprintError
from ..io import (atomic_dir, atomic_save_safetensors, atomic_write_json, atomic_write_text,
                  load_safetensors)
from ..models.load import _config_fixes, read_model_config, resolve_model_path
from .peft import Card, _card_text, check_output_dir, non_finite, read_native_adapter

log = logging.getLogger(__name__)

# Files beside the weights that a transformers checkpoint needs (tokenizer and generation).
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
             "chat_template.json", "chat_template.jinja", "generation_config.json",
             "preprocessor_config.json", "processor_config.json")
MAX_SHARD_BYTES = 5 * 1024 ** 3


@dataclass
class FuseResult:
    out_dir: Path
    fused_weights: list[str]
    dequantized: bool
    files: list[str] = field(default_factory=list)
    # top-level keys added to config.json for plain mlx-lm (rope_theta from rope_parameters)
    config_added: dict = field(default_factory=dict)


def fused_config(config: dict) -> tuple[dict, dict]:
    """(config.json to write, keys added): transformers 5 writes rope settings only under
    `rope_parameters`, and plain `mlx_lm.load` reads only a top-level `rope_theta` (else
    it silently uses its own default); the fused checkpoint carries both."""
    added = _config_fixes(config, None)
    return {**config, **added}, added


def _check_fused_finite(tensors: dict, keys: list[str], where: Path) -> None:
    hit = non_finite({k: tensors[k] for k in keys})
    if hit:
        k, bad, n = hit
        raise MindprintError(f"{where}: fused weight '{k}' has {bad}/{n} non-finite values "
                             "(NaN or inf, an overflow in the base dtype?); nothing written")


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise MindprintError(f"{path}: no model*.safetensors weights")
    return files


def _copy_aux(src: Path, dst: Path) -> None:
    for name in AUX_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def fuse(model: str | Path, adapter_dir: str | Path, out_dir: str | Path,
         dequantize: bool = False, card: Card = None,
         max_shard_bytes: int = MAX_SHARD_BYTES) -> FuseResult:
    """Write base `model` + the adapter in `adapter_dir` as one checkpoint in `out_dir`.

    card: README.md text, or a function of the FuseResult returning it; it is built before
    the output directory is swapped in, so a failing card writes nothing."""
    base = resolve_model_path(model)
    check_output_dir(out_dir, base, adapter_dir)
    config = read_model_config(base)
    modules, _, _ = read_native_adapter(adapter_dir)
    quant = config.get("quantization") or config.get("quantization_config")
    out = Path(out_dir)
    if quant and config.get("quantization"):
        if not dequantize:
            raise MindprintError(
                f"{base} is MLX-quantized ({quant}); transformers cannot read MLX quantized "
                "weights: pass --dequantize to write a full-precision checkpoint")
        return _fuse_quantized(model, base, config, adapter_dir, out, card, max_shard_bytes)
    if quant:
        raise MindprintError(f"{base}/config.json: quantization_config {quant.get('quant_method', quant)} "
                             "(a transformers-quantized base) is not supported; fuse onto the "
                             "full-precision base")
    deltas = {f"{path}.weight": m for path, m in modules.items()}
    fused: list[str] = []
    cfg_out, added = fused_config(config)
    res = FuseResult(out, fused, False, [], added)
    with atomic_dir(out) as tmp:
        for f in _weight_files(base):
            tensors = load_safetensors(f)
            hit = [k for k in deltas if k in tensors]
            for k in hit:
                w = tensors[k]
                d = deltas[k].delta_t().T
                if tuple(w.shape) != d.shape:
                    raise MindprintError(f"{f.name}: '{k}' has shape {tuple(w.shape)}, the "
                                         f"adapter's update {d.shape} (wrong base model?)")
                tensors[k] = (w.astype(mx.float32) + mx.array(d.astype(np.float32))).astype(w.dtype)
                fused.append(k)
            _check_fused_finite(tensors, hit, f)
            atomic_save_safetensors(tmp / f.name, tensors, metadata={"format": "pt"})
            del tensors
        missing = sorted(set(deltas) - set(fused))
        if missing:
            raise MindprintError(f"{base}: weights {', '.join(missing[:5])} not found in the "
                                 "checkpoint; the adapter does not belong to this base")
        for idx in base.glob("model*.safetensors.index.json"):
            shutil.copyfile(idx, tmp / idx.name)
        if added:
            atomic_write_json(tmp / "config.json", cfg_out)
        else:
            shutil.copyfile(base / "config.json", tmp / "config.json")
        _copy_aux(base, tmp)
        res.fused_weights = sorted(fused)
        text = _card_text(card, res)
        if text:
            atomic_write_text(tmp / "README.md", text)
        res.files = sorted(p.name for p in tmp.iterdir())
    return res


def _fuse_quantized(model, base: Path, config: dict, adapter_dir, out: Path, card,
                    max_shard_bytes: int) -> FuseResult:
    from mlx.utils import tree_flatten
    from mlx_lm.utils import dequantize_model

    from ..models import load, lora
    from ..models.adapters import load_adapter

    mdl, _ = load(model)
    name = load_adapter(mdl, adapter_dir, name="fuse")
    fused = [f"{p}.weight" for p, m in lora.lora_layers(mdl) if name in m.adapters]
    lora.merge(mdl, [name], dequantize=True)
    lora.unwrap(mdl)
    mdl = dequantize_model(mdl)
    weights = dict(tree_flatten(mdl.parameters()))
    cfg = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    dtype = str(next(iter(weights.values())).dtype).replace("mlx.core.", "")
    cfg["torch_dtype"] = dtype
    cfg, added = fused_config(cfg)
    _check_fused_finite(weights, [k for k in fused if k in weights], Path(adapter_dir))
    res = FuseResult(out, sorted(fused), True, [], added)
    with atomic_dir(out) as tmp:
        shards, cur, size = [], {}, 0
        for k in sorted(weights):
            nbytes = weights[k].nbytes
            if cur and size + nbytes > max_shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[k] = weights[k]
            size += nbytes
        shards.append(cur)
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = ("model.safetensors" if len(shards) == 1
                     else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
            atomic_save_safetensors(tmp / fname, shard, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        if len(shards) > 1:
            atomic_write_json(tmp / "model.safetensors.index.json", {
                "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
                "weight_map": weight_map})
        atomic_write_json(tmp / "config.json", cfg)
        _copy_aux(base, tmp)
        text = _card_text(card, res)
        if text:
            atomic_write_text(tmp / "README.md", text)
        res.files = sorted(p.name for p in tmp.iterdir())
    return res
