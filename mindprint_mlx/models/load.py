"""Load a base model with mlx-lm from a local Hugging Face directory or a hub id."""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..errors import MindprintError
from ..io import read_json_object

log = logging.getLogger(__name__)

# What a model directory needs; weights are read only from safetensors.
_HUB_PATTERNS = ["*.json", "model*.safetensors", "tokenizer.model", "*.tiktoken",
                 "tiktoken.model", "*.txt", "*.jinja"]


@dataclass
class ModelInfo:
    """Where a loaded base came from; saved beside adapters so they find their base."""

    source: str                 # what the user passed (path or hub id)
    path: str                   # resolved local directory
    model_type: str
    fingerprint: str            # sha256 over config.json and the weight files' names and sizes
    quantization: dict | None = None
    dtype: str | None = None
    config: dict = field(default_factory=dict, repr=False)

    def as_metadata(self) -> dict:
        return {"base_model": self.source, "base_model_path": self.path,
                "base_model_type": self.model_type, "base_fingerprint": self.fingerprint,
                "base_quantization": self.quantization}


def model_info(model: nn.Module) -> ModelInfo:
    info = getattr(model, "_mindprint_info", None)
    if info is None:
        raise MindprintError("this model was not loaded with mindprint_mlx.models.load")
    return info


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def looks_like_hub_id(s: str) -> bool:
    """`org/name` as the Hugging Face hub spells a repository id: ASCII letters, digits and
    `._-`, each part starting with a letter or digit, no `..`."""
    return bool(_HUB_ID.match(s)) and ".." not in s


def local_model_config(model: str | os.PathLike) -> tuple[dict, Path] | None:
    """(config.json, the directory that holds it) of `model`: a local model directory, or a
    hub id whose config.json is in the local hub cache; None when it is neither. Never
    reaches the network. A config.json that is not one JSON object is a MindprintError
    naming the file."""
    p = Path(str(model)).expanduser()
    if (p / "config.json").is_file():
        return read_json_object(p / "config.json"), p
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(str(model), "config.json")
    except Exception:  # noqa: BLE001 - not a valid repo id, no cache: just not found
        return None
    if isinstance(hit, str) and Path(hit).is_file():
        return read_json_object(Path(hit)), Path(hit).parent
    return None


def resolve_model_path(path_or_hub_id: str | os.PathLike) -> Path:
    """A local directory as is; `demo` (when no directory of that name is here) the demo
    model, built once into the cache (`models.tiny.demo_model`); a hub id through
    huggingface-hub's cache (offline if cached)."""
    s = str(path_or_hub_id)
    p = Path(s).expanduser()
    if s == "demo" and not p.exists():
        from .tiny import demo_model

        return demo_model()
    if p.exists():
        if not p.is_dir():
            raise MindprintError(f"model path {p} is a file; expected a model directory "
                                 "(config.json + *.safetensors)")
        return p
    if not looks_like_hub_id(s):
        raise MindprintError(f"model path not found: {s}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)
    try:
        try:
            return Path(snapshot_download(s, allow_patterns=_HUB_PATTERNS, local_files_only=True))
        except LocalEntryNotFoundError:
            return Path(snapshot_download(s, allow_patterns=_HUB_PATTERNS))
    except RepositoryNotFoundError:
        raise MindprintError(f"no model '{s}' on the Hugging Face hub (or it is private: "
                             "log in with `hf auth login` or set HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        raise MindprintError(f"model '{s}': no local directory of that name, not in the "
                             "hub cache, and the hub cannot be reached") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise MindprintError(f"could not fetch model '{s}': {str(e).splitlines()[0]}") from None


def read_model_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise MindprintError(f"{path} is not a model directory: config.json is missing")
    return read_config_file(cfg_file)


def read_config_file(cfg_file: Path) -> dict:
    """A model's config.json, checked to be a JSON object with a `model_type`."""
    config = read_json_object(cfg_file)
    if "model_type" not in config:
        raise MindprintError(f"{cfg_file}: has no 'model_type'; is this a Hugging Face model?")
    return config


def _fingerprint(path: Path) -> str:
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(glob.glob(str(path / "model*.safetensors"))):
        h.update(Path(f).name.encode())
        h.update(str(os.path.getsize(f)).encode())
    return h.hexdigest()[:16]


def _config_fixes(config: dict, path: Path | None = None) -> dict:
    """Keys mlx-lm needs that a transformers-5 checkpoint may only have nested (pure)."""
    fixes: dict[str, Any] = {}
    rp = config.get("rope_parameters")
    if "rope_theta" not in config and isinstance(rp, dict):
        # transformers 5 writes rope settings under rope_parameters; mlx-lm reads the
        # top-level key and otherwise silently uses its own per-architecture default.
        theta = rp.get("rope_theta")
        if theta is None and isinstance(rp.get("full_attention"), dict):
            theta = rp["full_attention"].get("rope_theta")
        if theta is not None:
            fixes["rope_theta"] = theta
        local = rp.get("sliding_attention")
        if isinstance(local, dict) and "rope_local_base_freq" not in config \
                and local.get("rope_theta") is not None:
            fixes["rope_local_base_freq"] = local["rope_theta"]
    return fixes


_NOTED: set[str] = set()


def rope_note(path: Path | str, fixes: dict) -> str | None:
    """What plain mlx-lm needs for a base whose config has only `rope_parameters`
    (transformers 5 checkpoints): the text of a one-time note, or None."""
    if "rope_theta" not in fixes:
        return None
    cfg = {k: fixes[k] for k in ("rope_theta", "rope_local_base_freq") if k in fixes}
    return (f"{path}: config.json has rope_theta only under rope_parameters ({fixes['rope_theta']}); "
            "mindprint uses it, but plain mlx-lm reads only a top-level rope_theta and otherwise "
            f"silently uses its default: load this base with mlx_lm.load(..., model_config={cfg!r})")


def _note_once(path: Path, fixes: dict) -> None:
    note = rope_note(path, fixes)
    key = str(Path(path).resolve())
    if note and key not in _NOTED:
        _NOTED.add(key)
        log.warning("%s", note)


def _name_bad_weight_file(path: Path) -> None:
    """After a failed load: raise the error of the first weight file that cannot be read
    (so the message names it); return when every file reads (the problem is elsewhere)."""
    from ..io import load_safetensors

    for f in sorted(path.glob("model*.safetensors")):
        try:
            load_safetensors(f)
        except MindprintError as e:
            raise MindprintError(f"{path}: cannot load the weights: {e}") from None


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _quantize(model: nn.Module, bits: int, group_size: int = 64) -> dict:
    def fits(path: str, m: nn.Module) -> bool:
        return hasattr(m, "to_quantized") and m.weight.shape[-1] % group_size == 0

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=fits)
    return {"group_size": group_size, "bits": bits}


def load(path_or_hub_id: str | os.PathLike, quantize: int | None = None,
         dtype: str | None = None, trust_remote_code: bool = False,
         lazy: bool = False) -> tuple[nn.Module, Any]:
    """Load `(model, tokenizer)` with mlx-lm.

    quantize: 4 or 8 quantizes the linear layers on load (QLoRA base); dtype: "float32",
    "bfloat16" or "float16" casts the floating weights. The tokenizer is mlx-lm's
    TokenizerWrapper. Remote code is never executed unless `trust_remote_code`.
    """
    if quantize not in (None, 4, 8):
        raise MindprintError(f"quantize must be 4, 8 or none, got {quantize!r}")
    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise MindprintError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    path = resolve_model_path(path_or_hub_id)
    config = read_model_config(path)
    # Imported only now: mlx-lm pulls in transformers (seconds), and a bad path should fail fast.
    from mlx_lm.utils import _get_classes, load_model, load_tokenizer

    try:
        _get_classes(config)
    except (ValueError, ImportError):
        raise MindprintError(f"{path}: architecture '{config.get('model_type')}' is not supported "
                             "by the installed mlx-lm") from None
    if not glob.glob(str(path / "model*.safetensors")):
        raise MindprintError(f"{path}: no model*.safetensors weights (mindprint loads weights "
                             "only from safetensors, never pickled .bin files)")
    fixes = _config_fixes(config, path)
    _note_once(path, fixes)
    try:
        model, config = load_model(path, lazy=lazy, model_config=fixes or None,
                                   trust_remote_code=trust_remote_code)
    except (ValueError, RuntimeError, OSError) as e:  # missing tensors, corrupt or cut files
        _name_bad_weight_file(path)
        raise MindprintError(f"{path}: cannot load the weights: {_first_line(e)}") from None
    try:
        tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except Exception as e:  # transformers/tokenizers raise many kinds; the user needs one line
        raise MindprintError(f"{path}: cannot load the tokenizer: {_first_line(e)}") from None
    if dtype is not None:
        model.set_dtype(getattr(mx, dtype))
    quant = config.get("quantization")
    if quantize is not None:
        if quant:
            raise MindprintError(f"{path} is already quantized ({quant}); drop --quantize")
        quant = _quantize(model, quantize)
    model.eval()
    if not lazy:
        mx.eval(model.parameters())
    model._mindprint_info = ModelInfo(
        source=str(path_or_hub_id), path=str(path.resolve()), model_type=config["model_type"],
        fingerprint=_fingerprint(path), quantization=quant, dtype=dtype, config=config)
    return model, tokenizer
