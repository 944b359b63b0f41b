"""mlx-lm LoRA adapters to and from PEFT LoRA adapters.

PEFT computes `y = W x + (lora_alpha / r) B A x` with A (r, in) and B (out, r); mlx-lm
computes `y = W x + scale (x a) b` with a (in, r) and b (r, out). So A = a.T, B = b.T and
lora_alpha = scale * r: a rename and a transpose, exact in both directions. A merged unit
adapter (ranks concatenated) exports the same way; `rank=` compresses it by SVD of each
module's update.

A reward model (adapter + scalar head) exports as a PEFT `SEQ_CLS` adapter whose head is
transformers' `score` layer; a value head goes beside a causal-LM adapter as TRL's
`v_head.summary` tensors in `model.safetensors`.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..errors import MindprintError
from ..io import (atomic_dir, atomic_save_safetensors, atomic_write_json, atomic_write_text,
                  load_safetensors, read_json_object, safetensors_header)
from ..models import adapters as native
from ..models.load import local_model_config
from .names import NameMap, name_map

log = logging.getLogger(__name__)

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
VALUE_HEAD_FILE = "model.safetensors"     # where TRL's value-head models look for v_head.*
PEFT_PREFIX = "base_model.model."
BIAS_TOLERANCE = 1e-4   # a reward-head bias this small is dropped without asking


@dataclass
class ModuleLoRA:
    """One module's factors in mlx-lm's layout: a (in, r), b (r, out), float64 numpy."""

    a: np.ndarray
    b: np.ndarray
    scale: float

    def delta_t(self) -> np.ndarray:
        """scale * a b: the update transposed, (in, out)."""
        return self.scale * (self.a @ self.b)


@dataclass
class ExportResult:
    out_dir: Path
    rank: int
    lora_alpha: float
    modules: int
    base_model: str | None
    model_type: str | None
    # relative Frobenius error per module when compressed by SVD ({} when exact)
    svd_errors: dict[str, float] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def max_svd_error(self) -> float:
        return max(self.svd_errors.values(), default=0.0)


# ---------------------------------------------------------------- base model lookup

def find_base_config(*candidates: str | None) -> tuple[dict | None, str | None]:
    """(config.json, its directory) of the first candidate that is a local model directory
    or a hub id whose config is in the local cache (`models.load.local_model_config`);
    never reaches the network."""
    for c in candidates:
        found = local_model_config(c) if c else None
        if found is not None:
            return found[0], str(found[1])
    return None, None


def _text_config(config: dict) -> dict:
    return config.get("text_config") or config


def _num_layers(config: dict | None) -> int | None:
    if not config:
        return None
    v = _text_config(config).get("num_hidden_layers")
    return int(v) if isinstance(v, int) else None


def check_output_dir(out: str | Path, *sources: str | Path | None) -> Path:
    """`out` is replaced as a whole: it must not be (or contain) an input, and an existing
    non-empty directory must look like an earlier export (never wipe an unrelated one)."""
    out = Path(out).expanduser()
    o = out.resolve()
    for src in sources:
        if src is None or not Path(src).exists():
            continue
        s = Path(src).resolve()
        if s == o or o in s.parents:
            raise MindprintError(f"output directory {out} is (or contains) the input {src}; "
                                 "choose another output directory")
    if out.is_dir() and any(out.iterdir()) and not any(
            (out / f).is_file() for f in ("adapter_config.json", "config.json")):
        raise MindprintError(f"output directory {out} exists and holds other files; refusing to "
                             "replace it (remove it or choose another directory)")
    if out.exists() and not out.is_dir():
        raise MindprintError(f"output path {out} is a file")
    return out


# ---------------------------------------------------------------- reading native adapters

def non_finite(tensors: dict) -> tuple[str, int, int] | None:
    """(name, non-finite count, size) of the first tensor (by name) holding NaN or inf."""
    for k in sorted(tensors):
        v = tensors[k]
        if not mx.issubdtype(v.dtype, mx.floating):
            continue
        bad = int(mx.sum(~mx.isfinite(v)).item())
        if bad:
            return k, bad, int(v.size)
    return None


def check_finite(tensors: dict, source: str | Path) -> None:
    """Refuse tensors holding NaN/inf, naming the first such tensor."""
    hit = non_finite(tensors)
    if hit:
        k, bad, n = hit
        raise MindprintError(f"{source}: tensor '{k}' has {bad}/{n} non-finite values (NaN or "
                             "inf); refusing to export or fuse it (use an earlier checkpoint)")


def read_native_adapter(adapter_dir: str | Path) -> tuple[dict[str, ModuleLoRA], dict, dict]:
    """({mlx module path: ModuleLoRA}, adapter_config.json, mindprint.json) of an mlx-lm
    LoRA adapter directory; anything that is not a plain LoRA pair is an error."""
    d = Path(adapter_dir)
    cfg, meta = native.read_adapter_config(d)
    kind = cfg.get("fine_tune_type", "lora")
    if kind != "lora":
        raise MindprintError(f"{d / native.ADAPTER_CONFIG}: fine_tune_type '{kind}' cannot be "
                             "exported (only plain LoRA maps to PEFT LoRA; DoRA and full "
                             "fine-tunes do not)")
    params = cfg.get("lora_parameters") or {}
    try:
        scale = float(params.get("scale", 20.0))
        rank = int(params["rank"])
    except (KeyError, TypeError, ValueError) as e:
        raise MindprintError(f"{d / native.ADAPTER_CONFIG}: bad lora_parameters ({e!r})") from None
    weights = load_safetensors(d / native.ADAPTER_WEIGHTS)
    check_finite(weights, d / native.ADAPTER_WEIGHTS)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for k, v in weights.items():
        path, leaf = k.rsplit(".", 1) if "." in k else ("", k)
        if leaf not in ("lora_a", "lora_b"):
            what = ("an adapter bias" if leaf == "bias" else
                    "a DoRA magnitude" if leaf == "m" else "not a LoRA factor")
            raise MindprintError(
                f"{d / native.ADAPTER_WEIGHTS}: tensor '{k}' is {what}; PEFT LoRA has no place "
                "for it (export supports plain LoRA pairs lora_a/lora_b only)")
        pairs.setdefault(path, {})[leaf] = np.array(v.astype(mx.float32), dtype=np.float64)
    modules = {}
    for path, ab in sorted(pairs.items()):
        if set(ab) != {"lora_a", "lora_b"}:
            missing = ({"lora_a", "lora_b"} - set(ab)).pop()
            raise MindprintError(f"{d / native.ADAPTER_WEIGHTS}: '{path}.{missing}' is missing")
        a, b = ab["lora_a"], ab["lora_b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise MindprintError(f"{d / native.ADAPTER_WEIGHTS}: '{path}' has lora_a "
                                 f"{a.shape} and lora_b {b.shape}, not (in, r) and (r, out)")
        if a.shape[1] != rank:
            raise MindprintError(f"{d / native.ADAPTER_WEIGHTS}: '{path}' has rank {a.shape[1]}, "
                                 f"{native.ADAPTER_CONFIG} says rank {rank}")
        modules[path] = ModuleLoRA(a, b, scale)
    if not modules:
        raise MindprintError(f"{d / native.ADAPTER_WEIGHTS}: holds no LoRA tensors")
    return modules, cfg, meta


# ---------------------------------------------------------------- SVD compression

def svd_compress(m: ModuleLoRA, rank: int) -> tuple[ModuleLoRA, float]:
    """Best rank-`rank` approximation of the module's update (Eckart-Young), scale 1,
    and its relative Frobenius error. Works on the r x r core, never the full matrix."""
    qa, ra = np.linalg.qr(m.a)            # a = qa ra, (in, r)
    qb, rb = np.linalg.qr(m.b.T)          # b.T = qb rb, (out, r)
    core = m.scale * (ra @ rb.T)          # delta_t = qa core qb.T
    u, s, vt = np.linalg.svd(core)
    k = min(rank, len(s))
    total = float(np.sqrt(np.sum(s ** 2)))
    err = float(np.sqrt(np.sum(s[k:] ** 2)) / total) if total > 0 else 0.0
    root = np.sqrt(s[:k])
    a = (qa @ u[:, :k]) * root[None, :]
    b = (root[:, None] * vt[:k]) @ qb.T
    return ModuleLoRA(a, b, 1.0), err


# ---------------------------------------------------------------- export

def _target_spec(hf_modules: list[str], nm: NameMap, n_layers: int | None) -> dict:
    """PEFT config keys that select exactly `hf_modules`."""
    prefix = nm.hf_layers + "."
    by_layer: dict[int, set[str]] = {}
    for p in hf_modules:
        layer, rest = p[len(prefix):].split(".", 1)
        by_layer.setdefault(int(layer), set()).add(rest)
    targets = sorted(set().union(*by_layer.values()))
    layers = sorted(by_layer)
    product = all(by_layer[i] == set(targets) for i in layers)
    if not product:
        # different modules in different layers (a merged adapter whose units differ)
        return {"target_modules": "(" + "|".join(re.escape(p) for p in sorted(hf_modules)) + ")",
                "layers_to_transform": None, "layers_pattern": None}
    all_layers = n_layers is not None and layers == list(range(n_layers))
    if nm.anchored_targets:
        layer_re = r"\d+" if all_layers else "(" + "|".join(map(str, layers)) + ")"
        return {"target_modules": re.escape(prefix) + layer_re + r"\.("
                + "|".join(re.escape(t) for t in targets) + ")",
                "layers_to_transform": None, "layers_pattern": None}
    if all_layers:
        return {"target_modules": targets, "layers_to_transform": None, "layers_pattern": None}
    return {"target_modules": targets, "layers_to_transform": layers,
            "layers_pattern": nm.hf_layers.rsplit(".", 1)[-1]}


def _peft_config(*, r: int, lora_alpha: float, dropout: float, task_type: str,
                 base_model: str | None, targets: dict, modules_to_save: list[str] | None) -> dict:
    alpha: Any = int(lora_alpha) if float(lora_alpha).is_integer() else float(lora_alpha)
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": int(r),
        "lora_alpha": alpha,
        "lora_dropout": float(dropout),
        **targets,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": modules_to_save,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
        "revision": None,
    }


def _resolve_base(meta: dict, cfg: dict, base_model: str | None, model: str | None):
    """(base model id for the PEFT config, base config.json or None)."""
    config, _ = find_base_config(model, meta.get("base_model_path"), meta.get("base_model"),
                                 cfg.get("model"), base_model)
    name = base_model or meta.get("base_model") or cfg.get("model") or model
    return name, config


def _model_type(meta: dict, config: dict | None) -> str | None:
    return (config or {}).get("model_type") or meta.get("base_model_type")


def _peft_tensors(modules: dict[str, ModuleLoRA], nm: NameMap, dtype) -> tuple[dict, list[str]]:
    out, hf_modules = {}, []
    for path, m in modules.items():
        hf = nm.to_hf(path)
        hf_modules.append(hf)
        out[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = mx.array(m.a.T.astype(np.float32)).astype(dtype)
        out[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = mx.array(m.b.T.astype(np.float32)).astype(dtype)
    return out, hf_modules


def _prepare(adapter_dir, rank, base_model, model):
    modules, cfg, meta = read_native_adapter(adapter_dir)
    base_name, config = _resolve_base(meta, cfg, base_model, model)
    mtype = _model_type(meta, config)
    if mtype is None:
        log.warning("%s: base model type unknown (no mindprint.json and no base config "
                    "found); pass --model BASE_DIR to check module names", adapter_dir)
    nm = name_map(mtype)
    params = cfg.get("lora_parameters") or {}
    r = int(params["rank"])
    scale = float(params.get("scale", 20.0))
    errors: dict[str, float] = {}
    if rank is not None:
        if rank < 1:
            raise MindprintError(f"--rank must be >= 1, got {rank}")
        if rank < r:
            compressed = {}
            for path, m in modules.items():
                compressed[path], errors[path] = svd_compress(m, rank)
            modules, r, scale = compressed, rank, 1.0
        else:
            log.info("adapter rank %d <= requested rank %d: exported exactly", r, rank)
    lora_alpha = scale * r
    return modules, cfg, meta, base_name, config, mtype, nm, r, lora_alpha, errors


def _dtype_of(adapter_dir: Path):
    w = load_safetensors(Path(adapter_dir) / native.ADAPTER_WEIGHTS)
    return next(iter(w.values())).dtype


Card = Union[str, Callable[["ExportResult"], str], None]


# The base's tokenizer and generation files, written beside an exported adapter so that
# `AutoTokenizer.from_pretrained(adapter_dir)` gives the chat template and EOS set the
# adapter was trained with.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "chat_template.json", "chat_template.jinja", "generation_config.json")


def _copy_tokenizer_files(tmp: Path, meta: dict, cfg: dict, model: str | None,
                          notes: list[str]) -> None:
    for c in (model, meta.get("base_model_path"), meta.get("base_model"), cfg.get("model")):
        d = _local_model_dir(c)
        if d is not None and (d / "tokenizer_config.json").is_file():
            for name in TOKENIZER_FILES:
                if (d / name).is_file():
                    shutil.copyfile(d / name, tmp / name)
            return
    notes.append("tokenizer files not included: the base model is not on this machine "
                 "(pass --model BASE_DIR)")


def _card_text(card: Card, res) -> str | None:
    """The README.md text: built before anything is swapped into place, so a failing card
    leaves the output directory as it was."""
    return card(res) if callable(card) else card


def quantized_base_note(base_name: str | None) -> str | None:
    """A note when `base_name` is an MLX-quantized model directory (or cached hub id):
    transformers cannot load MLX's packed weights, so PEFT users need another base."""
    if not base_name:
        return None
    config, _ = find_base_config(base_name)
    if config and config.get("quantization"):
        return (f"base_model_name_or_path '{base_name}' is an MLX-quantized model "
                f"({config['quantization']}); transformers cannot load that directory: pass "
                "--base-model with the full-precision base (hub id or path) it was quantized from")
    return None


def export_peft(adapter_dir: str | Path, out_dir: str | Path, rank: int | None = None,
                base_model: str | None = None, model: str | None = None,
                value_head: bool = True, card: Card = None) -> ExportResult:
    """Write the mlx-lm adapter in `adapter_dir` as a PEFT LoRA (`CAUSAL_LM`) adapter.

    rank: compress to this rank by SVD (errors in the result); base_model: the id written
    as `base_model_name_or_path` (default: the one the adapter was trained on); model: a
    local base directory to read the architecture from when the adapter's metadata lacks
    it. A value head saved beside the adapter goes to `model.safetensors` as TRL's
    `v_head.summary.weight/bias`. card: README.md text to write beside the files, or a
    function of the ExportResult that returns it (called before the output is swapped in).
    """
    adapter_dir = Path(adapter_dir)
    check_output_dir(out_dir, adapter_dir, model)
    (modules, cfg, meta, base_name, config, mtype, nm, r, lora_alpha,
     errors) = _prepare(adapter_dir, rank, base_model, model)
    tensors, hf_modules = _peft_tensors(modules, nm, _dtype_of(adapter_dir))
    dropout = float((cfg.get("lora_parameters") or {}).get("dropout", 0.0))
    pcfg = _peft_config(r=r, lora_alpha=lora_alpha, dropout=dropout, task_type="CAUSAL_LM",
                        base_model=base_name,
                        targets=_target_spec(hf_modules, nm, _num_layers(config)),
                        modules_to_save=None)
    heads = native.load_heads(adapter_dir)
    notes = []
    below = [n for n in (meta.get("frozen_below") or []) + (meta.get("stack") or [])
             if n != meta.get("adapter_name")]
    if below:
        notes.append(f"this adapter was trained on top of {sorted(set(below))}; alone it is only "
                     "the last step: export the merged unit or final_adapter for the whole effect")
    qnote = quantized_base_note(base_name)
    if qnote:
        log.warning("%s", qnote)
        notes.append(qnote)
    if "value" in heads and value_head:
        check_finite({f"value.{k}": v for k, v in tree_flatten(heads["value"].parameters())},
                     adapter_dir / native.HEADS)
    out = Path(out_dir)
    res = ExportResult(out, r, lora_alpha, len(modules), base_name, mtype, errors, [], notes)
    with atomic_dir(out) as tmp:
        atomic_save_safetensors(tmp / PEFT_WEIGHTS, tensors, metadata={"format": "pt"})
        atomic_write_json(tmp / PEFT_CONFIG, pcfg)
        if value_head and "value" in heads:
            vh = heads["value"]
            atomic_save_safetensors(tmp / VALUE_HEAD_FILE, {
                "v_head.summary.weight": vh.summary.weight.astype(mx.float32),
                "v_head.summary.bias": mx.array([vh.bias_value], dtype=mx.float32)},
                metadata={"format": "pt"})
            notes.append("value head written as TRL's v_head.summary (model.safetensors)")
        if "reward" in heads:
            notes.append("reward head not included: use `mindprint export reward` for a "
                         "SEQ_CLS adapter")
        _copy_tokenizer_files(tmp, meta, cfg, model, notes)
        text = _card_text(card, res)
        if text:
            atomic_write_text(tmp / "README.md", text)
        res.files = sorted(p.name for p in tmp.iterdir())
    return res


def export_reward(reward_dir: str | Path, out_dir: str | Path, head: str = "reward",
                  drop_bias: bool = False, rank: int | None = None,
                  base_model: str | None = None, model: str | None = None,
                  card: Card = None) -> ExportResult:
    """Write a reward model (adapter + scalar head `head`) as a PEFT `SEQ_CLS` adapter.

    The head becomes transformers' `score` layer (`num_labels=1`), saved through PEFT's
    `modules_to_save`. That layer has no bias: a head bias above 1e-4 in magnitude is an
    error unless `drop_bias`, which exports scores shifted by -bias (Bradley-Terry preferences, which
    depend on score differences only, are unchanged); the bias is recorded in
    `mindprint_reward.json`. `reward_dir` is the adapter directory or the training output
    (the pipeline's `reward_model/`) that holds it in `adapter/`. mindprint trains the head
    without a bias, so there is nothing to drop.
    """
    reward_dir = reward_adapter_dir(reward_dir)
    check_output_dir(out_dir, reward_dir, model)
    heads = native.load_heads(reward_dir)
    if head not in heads:
        raise MindprintError(f"{reward_dir / native.HEADS}: no head named '{head}' "
                             f"(found: {', '.join(heads) or 'no heads file'})")
    (modules, cfg, meta, base_name, config, mtype, nm, r, lora_alpha,
     errors) = _prepare(reward_dir, rank, base_model, model)
    tensors, hf_modules = _peft_tensors(modules, nm, _dtype_of(reward_dir))
    summary = heads[head].summary
    check_finite({f"{head}.{k}": v for k, v in tree_flatten(heads[head].parameters())},
                 reward_dir / native.HEADS)
    bias = heads[head].bias_value
    notes = []
    if bias != 0.0:
        # Bradley-Terry's gradient w.r.t. the bias is zero, but weight decay and rounding move
        # it (heads trained before mindprint dropped the bias); below the parity tolerance it
        # is dropped (and noted) without asking.
        if not drop_bias and abs(bias) > BIAS_TOLERANCE:
            raise MindprintError(
                f"{reward_dir / native.HEADS}: head '{head}' has bias {bias:.6g}, and "
                "transformers' sequence-classification `score` layer has no bias; pass "
                "--drop-bias to export scores shifted by that constant (preferences unchanged)")
        notes.append(f"head bias {bias:.6g} dropped: exported scores = mindprint scores - bias")
    tensors[f"{PEFT_PREFIX}score.weight"] = summary.weight.astype(mx.float32)
    dropout = float((cfg.get("lora_parameters") or {}).get("dropout", 0.0))
    pcfg = _peft_config(r=r, lora_alpha=lora_alpha, dropout=dropout, task_type="SEQ_CLS",
                        base_model=base_name,
                        targets=_target_spec(hf_modules, nm, _num_layers(config)),
                        modules_to_save=["score"])
    text_cfg = _text_config(config or {})
    pad = text_cfg.get("pad_token_id")
    eos = text_cfg.get("eos_token_id")
    eos = set(eos) if isinstance(eos, list) else {eos}
    if config is not None and (pad is None or pad in eos):
        # transformers reads the score at the last token != pad_token_id; mindprint reads it
        # at the EOS that ends each response, so pad must never be EOS.
        notes.append(f"the base config's pad_token_id is {pad} (eos {sorted(e for e in eos if e is not None)}): "
                     "set model.config.pad_token_id to an id that is not EOS and pad with it, "
                     "or transformers reads the score before the EOS")
    qnote = quantized_base_note(base_name)
    if qnote:
        log.warning("%s", qnote)
        notes.append(qnote)
    out = Path(out_dir)
    res = ExportResult(out, r, lora_alpha, len(modules), base_name, mtype, errors, [], notes)
    with atomic_dir(out) as tmp:
        atomic_save_safetensors(tmp / PEFT_WEIGHTS, tensors, metadata={"format": "pt"})
        atomic_write_json(tmp / PEFT_CONFIG, pcfg)
        atomic_write_json(tmp / "mindprint_reward.json", {
            "head": head, "num_labels": 1, "head_bias": bias, "bias_dropped": bias != 0.0,
            "pad_token_id": pad, "base_model": base_name})
        text = _card_text(card, res)
        if text:
            atomic_write_text(tmp / "README.md", text)
        res.files = sorted(p.name for p in tmp.iterdir())
    return res


def reward_adapter_dir(reward_dir: str | Path) -> Path:
    """The adapter directory of a reward model: `reward_dir` itself, or its `adapter/`
    (what train_reward_model and the pipeline's `reward_model/` hold)."""
    d = Path(reward_dir)
    if not (d / native.ADAPTER_CONFIG).is_file() and (d / "adapter" / native.ADAPTER_CONFIG).is_file():
        return d / "adapter"
    return d


# ---------------------------------------------------------------- import

def named_adapter_subfolders(d: Path) -> list[str]:
    """Subfolders of `d` that hold a PEFT adapter (PEFT's save_pretrained puts an adapter
    named other than 'default' in `d/<name>/`)."""
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir()
                  if p.is_dir() and (p / PEFT_CONFIG).is_file())


def _local_model_dir(where: str | None) -> Path | None:
    if not where:
        return None
    p = Path(where).expanduser()
    if p.is_dir():
        return p
    found = local_model_config(where)
    return None if found is None else found[1]


def base_linear_shapes(config: dict, where: str | None) -> dict[str, tuple[int, int]]:
    """{weight name: (out, in)} of the 2-D weights in the base's safetensors files, read
    from the headers only; MLX-quantized (packed) widths are unpacked. {} when the base
    weights are not on disk."""
    d = _local_model_dir(where)
    if d is None:
        return {}
    bits = (config.get("quantization") or {}).get("bits") if isinstance(
        config.get("quantization"), dict) else None
    out = {}
    for f in sorted(d.glob("model*.safetensors")):
        header = safetensors_header(f)
        for k, v in header.items():
            shape = v.get("shape") if isinstance(v, dict) else None
            if not k.endswith(".weight") or not isinstance(shape, list) or len(shape) != 2:
                continue
            o, i = shape
            if bits and v.get("dtype") == "U32":
                i = i * 32 // bits
            out[k[:-len(".weight")]] = (int(o), int(i))
    return out


def shape_problem(state: dict, base_shapes: dict, nm: NameMap, n_layers: int | None) -> str | None:
    """What is wrong with imported mlx-lm LoRA tensors for this base (None: they fit):
    a layer the base lacks, or factor shapes that do not match the base's (out, in)."""
    paths = sorted({k.rsplit(".", 1)[0] for k in state})
    for p in paths:
        i, _ = nm.split_mlx(p)
        if n_layers is not None and i >= n_layers:
            return f"module '{p}': layer {i}, the base has {n_layers} layers"
    if not base_shapes:
        return None
    found = [p for p in paths if p in base_shapes or nm.to_hf(p) in base_shapes]
    if not found:
        return None   # the checkpoint names its weights differently (e.g. multimodal)
    for p in paths:
        shape = base_shapes.get(p) or base_shapes.get(nm.to_hf(p))
        if shape is None:
            return f"module '{nm.to_hf(p)}' is not a linear layer of the base"
        o, i = shape
        a, b = state[f"{p}.lora_a"], state[f"{p}.lora_b"]   # (in, r), (r, out)
        hf = nm.to_hf(p)
        if a.shape[0] != i:
            return (f"tensor '{PEFT_PREFIX}{hf}.lora_A.weight' has shape {tuple(a.T.shape)}, the "
                    f"base's '{hf}' is {o}x{i}: lora_A needs (r, {i})")
        if b.shape[1] != o:
            return (f"tensor '{PEFT_PREFIX}{hf}.lora_B.weight' has shape {tuple(b.T.shape)}, the "
                    f"base's '{hf}' is {o}x{i}: lora_B needs ({o}, r)")
    return None


_UNSUPPORTED_FLAGS = (
    ("use_dora", "DoRA (use_dora: true)"),
    ("lora_bias", "LoRA biases (lora_bias: true)"),
    ("fan_in_fan_out", "fan_in_fan_out (Conv1D-style weights)"),
    ("use_qalora", "QALoRA (use_qalora: true)"),
)


def _check_peft_config(pcfg: dict, where: Path) -> None:
    if pcfg.get("peft_type", "LORA") != "LORA":
        raise MindprintError(f"{where}: peft_type '{pcfg.get('peft_type')}' is not supported "
                             "(only LORA)")
    for key, what in _UNSUPPORTED_FLAGS:
        if pcfg.get(key):
            raise MindprintError(f"{where}: {what} is not supported by mindprint's LoRA")
    for key in ("rank_pattern", "alpha_pattern"):
        if pcfg.get(key):
            raise MindprintError(f"{where}: {key} {pcfg[key]} is not supported (mlx-lm adapters "
                                 "have one rank and one scale); re-save the adapter without it")
    if pcfg.get("bias", "none") != "none":
        raise MindprintError(f"{where}: bias '{pcfg['bias']}' (trained base-layer biases) is "
                             "not supported; only bias 'none' maps to an mlx-lm adapter")
    for key in ("target_parameters", "trainable_token_indices", "layer_replication"):
        if pcfg.get(key):
            raise MindprintError(f"{where}: {key} is not supported")


def import_peft(peft_dir: str | Path, out_dir: str | Path, model: str | None = None,
                name: str | None = None) -> Path:
    """Write the PEFT LoRA adapter in `peft_dir` as an mlx-lm adapter directory.

    model: the base (local directory or cached hub id) to read the architecture and layer
    count from; default: the adapter's `base_model_name_or_path`. A `SEQ_CLS` adapter's
    `score` layer (modules_to_save) becomes the "reward" head; other modules_to_save,
    DoRA, rank/alpha patterns and trained biases are errors naming the feature.
    """
    d = Path(peft_dir)
    check_output_dir(out_dir, d, model)
    cfg_file, w_file = d / PEFT_CONFIG, d / PEFT_WEIGHTS
    if not cfg_file.is_file() or not w_file.is_file():
        named = named_adapter_subfolders(d)
        if not cfg_file.is_file() and named:
            raise MindprintError(
                f"{d} holds no adapter itself, but named PEFT adapter(s) in subfolder(s) "
                f"{', '.join(repr(n) for n in named)} (PEFT saves a non-default adapter name "
                f"under its own folder): import {d / named[0]}")
        raise MindprintError(f"{d} is not a PEFT adapter directory (needs {PEFT_CONFIG} and "
                             f"{PEFT_WEIGHTS}; pickled adapter_model.bin is not read)")
    pcfg = read_json_object(cfg_file)
    _check_peft_config(pcfg, cfg_file)
    task = pcfg.get("task_type") or "CAUSAL_LM"
    to_save = list(pcfg.get("modules_to_save") or [])
    head_modules = {"score", "classifier"} if task == "SEQ_CLS" else set()
    unmapped = [m for m in to_save if m not in head_modules]
    if unmapped:
        raise MindprintError(f"{cfg_file}: modules_to_save {unmapped} cannot be mapped (only a "
                             "SEQ_CLS adapter's 'score' head maps, to a reward head)")
    base_name = pcfg.get("base_model_name_or_path")
    config, where = find_base_config(model, base_name)
    if config is None:
        raise MindprintError(f"{cfg_file}: base model '{base_name}' not found locally; pass "
                             "--model BASE (a model directory or a cached hub id)")
    mtype = config.get("model_type")
    nm = name_map(mtype)
    n_layers = _num_layers(config)
    r, alpha = pcfg.get("r"), pcfg.get("lora_alpha", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise MindprintError(f"{cfg_file}: 'r' must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise MindprintError(f"{cfg_file}: 'lora_alpha' must be a finite number, got {alpha!r}")
    alpha = float(alpha)
    scale = alpha / (math.sqrt(r) if pcfg.get("use_rslora") else r)

    weights = load_safetensors(w_file)
    check_finite(weights, w_file)
    base_shapes = base_linear_shapes(config, where)
    state: dict[str, mx.array] = {}
    head_weight = None
    for k, v in weights.items():
        key = k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k
        if key in ("score.weight", "classifier.weight") and head_modules:
            head_weight = v
            continue
        if key.endswith(("score.bias", "classifier.bias")) and head_modules:
            raise MindprintError(f"{w_file}: '{k}': a biased classification head is not supported")
        if ".lora_magnitude_vector" in key:
            raise MindprintError(f"{w_file}: '{k}' is a DoRA magnitude; DoRA is not supported")
        if ".lora_embedding_" in key:
            raise MindprintError(f"{w_file}: '{k}': LoRA on embeddings is not supported")
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise MindprintError(f"{w_file}: tensor '{k}' is not a LoRA factor "
                                 "(lora_A/lora_B); cannot import it")
        module, which = m.group(1), m.group(2)
        mlx_path = nm.to_mlx(module)
        t = v.astype(mx.float32)
        if t.ndim != 2:
            raise MindprintError(f"{w_file}: '{k}' has shape {tuple(t.shape)}; a LoRA factor is 2-D")
        if which == "A":
            if t.shape[0] != r:
                raise MindprintError(f"{w_file}: '{k}' has rank {t.shape[0]}, config r is {r} "
                                     "(per-module ranks are not supported)")
            state[f"{mlx_path}.lora_a"] = t.T
        else:
            if t.shape[1] != r:
                raise MindprintError(f"{w_file}: '{k}' has rank {t.shape[1]}, config r is {r}")
            state[f"{mlx_path}.lora_b"] = t.T
    paths = {k.rsplit(".", 1)[0] for k in state}
    for p in paths:
        for leaf in ("lora_a", "lora_b"):
            if f"{p}.{leaf}" not in state:
                raise MindprintError(f"{w_file}: module '{p}' lacks its {leaf} factor")
    if not paths:
        raise MindprintError(f"{w_file}: holds no LoRA tensors")
    problem = shape_problem(state, base_shapes, nm, n_layers)
    if problem:
        raise MindprintError(f"{w_file}: {problem} (is '{where}' this adapter's base model?)")
    layers, targets = set(), set()
    for p in paths:
        i, rest = nm.split_mlx(p)
        layers.add(i)
        targets.add(rest)
    if n_layers is None:
        raise MindprintError(f"{where}/config.json: no num_hidden_layers")
    settings = {"r": r, "alpha": scale * r, "dropout": float(pcfg.get("lora_dropout") or 0.0),
                "targets": sorted(targets), "layers": sorted(layers)}
    heads = None
    if head_weight is not None:
        from ..models.heads import ScalarHead
        if head_weight.ndim != 2 or head_weight.shape[0] != 1:
            raise MindprintError(f"{w_file}: score head has shape {tuple(head_weight.shape)}; a "
                                 "reward head needs num_labels 1")
        hidden = _text_config(config).get("hidden_size")
        if isinstance(hidden, int) and head_weight.shape[1] != hidden:
            raise MindprintError(f"{w_file}: score head is {head_weight.shape[1]} wide, the base's "
                                 f"hidden_size is {hidden} (wrong base model?)")
        info_file = d / "mindprint_reward.json"
        bias = 0.0
        if info_file.is_file():   # our own export: put back the bias it had to drop
            raw = read_json_object(info_file).get("head_bias") or 0.0
            if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
                raise MindprintError(f"{info_file}: 'head_bias' must be a finite number, got {raw!r}")
            bias = float(raw)
        h = ScalarHead(int(head_weight.shape[-1]), bias=bias != 0.0)
        h.summary.weight = head_weight.astype(mx.float32)
        if bias != 0.0:
            h.summary.bias = mx.array([bias])
        heads = {"reward": h}
    elif head_modules:
        raise MindprintError(f"{w_file}: SEQ_CLS adapter without a score.weight tensor")
    meta = {"base_model": base_name if model is None else model, "base_model_type": mtype,
            "adapter_name": name or ("reward" if heads else "imported"),
            "imported_from": {"format": "peft", "path": str(d), "task_type": task,
                              "base_model_name_or_path": base_name}}
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        native.write_adapter_dir(tmp, state, settings, n_layers, meta, heads)
    return out
