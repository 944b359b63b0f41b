"""Memory planner: estimate the peak memory of SFT, reward training and the refine methods
(PPO, GRPO, RLOO, DPO, DITTO) before a run.

Reads only a model's config.json (and, when present, the safetensors *headers* for the
stored dtype); no weight is loaded. Parameter shapes come from instantiating the mlx-lm
model class lazily (MLX allocates nothing until an array is evaluated), so every
architecture mlx-lm supports is covered exactly; an unsupported one falls back to the
usual decoder formula.

The estimate is the sum of
- weights: the base as it sits in memory (dtype, or 4/8-bit with group scales and biases);
- adapters: the LoRA tensors of every adapter the phase holds (float32), and scalar heads;
- optimizer: gradients plus AdamW's two moments for the trainable adapter (float32);
- activations: what a forward pass keeps for the backward pass (per decoder layer: the
  hidden states, projections, MLP intermediates and attention probabilities; without
  gradient checkpointing all layers, with it only each layer's input plus one layer's
  working set) and the output-layer logits with their cross-entropy temporaries;
- kv_cache: PPO rollouts' keys and values (mlx-lm's KVCache grows in 256-token steps).
PPO's peak is the larger of the rollout (cache + one step's logits) and the training
step. GRPO and RLOO are PPO's model with k samples per prompt (batch x group_size rows)
and no value head; DPO trains on 2 rows per pair (chosen and rejected through one pass),
its reference log-probabilities a no-grad pass over the same rows, no generation; DITTO is
the larger of its sampling (a KV cache for `forward_batch` prompts) and a DPO step. Every
method holds one base: the reference is the frozen adapters on the same weights. Checked
against `mx.get_peak_memory()` on tiny models by tests/test_plan.py.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import MindprintError

PHASES = ("sft", "reward", "ppo", "grpo", "rloo", "dpo", "ditto")
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "F32": 4, "F16": 2, "BF16": 2,
                "F64": 8, "I64": 8, "I32": 4, "U32": 4, "I8": 1, "U8": 1, "BOOL": 1}
DEFAULT_TARGETS = ("o_proj", "v_proj", "up_proj", "down_proj")
GiB = 1024 ** 3


@dataclass
class MemoryEstimate:
    phase: str
    weights: int
    adapters: int
    optimizer: int
    activations: int
    kv_cache: int
    total: int
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModelShape:
    """What the planner needs to know about a base model."""

    model_type: str
    n_params: int
    weight_bytes: int                 # as stored in memory (after optional quantization)
    dtype_bytes: int                  # bytes per activation element (compute dtype)
    num_layers: int
    hidden: int
    intermediate: int
    vocab: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    linear_dims: dict = field(default_factory=dict)   # per-layer target name -> (in, out)
    quantized_bits: int | None = None


def _read_config(model: str | os.PathLike | dict) -> tuple[dict, Path | None]:
    if isinstance(model, dict):
        return dict(model), None
    from .models.load import read_config_file, read_model_config, resolve_model_path

    p = Path(model)
    if p.is_file() and p.name.endswith(".json"):
        return read_config_file(p), None
    path = resolve_model_path(model)
    return read_model_config(path), path


def _stored_dtype(config: dict, path: Path | None) -> str:
    """The weights' floating dtype: from the safetensors headers if we have the files."""
    if path is not None:
        from .io import safetensors_header

        for f in sorted(path.glob("model*.safetensors")):
            for k, v in safetensors_header(f).items():
                if k != "__metadata__" and isinstance(v, dict) and v.get("dtype") in ("F32", "F16", "BF16"):
                    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[v["dtype"]]
    d = config.get("torch_dtype") or config.get("dtype")
    if isinstance(d, str) and d in ("float32", "float16", "bfloat16"):
        return d
    return "bfloat16"


def _param_shapes(config: dict) -> tuple[list[tuple[str, tuple]], dict, Any]:
    """(flat parameter shapes, {module path: kind}, model) from a lazily built mlx-lm model."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    Model, Args = _get_classes(config)
    cfg = {k: v for k, v in config.items() if k != "quantization"}
    model = Model(Args.from_dict(cfg))
    params = dict(tree_flatten(model.parameters()))
    kinds = {}
    for path, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)) and hasattr(m, "to_quantized"):
            kinds[path] = "quantizable"
    tc = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    tied = config.get("tie_word_embeddings", tc.get("tie_word_embeddings"))
    if tied is not False and any(k.split(".")[-2:-1] == ["lm_head"] for k in params):
        # some mlx-lm classes (gemma3_text) always build an lm_head and drop it in sanitize()
        # when the checkpoint has none, i.e. tied embeddings: let sanitize decide, as load does
        try:
            model.sanitize({k: v for k, v in params.items() if ".lm_head." not in f".{k}"})
            params = dict(tree_flatten(model.parameters()))
        except Exception:  # noqa: BLE001 - a sanitize that needs real weights: keep the count
            pass
    shapes = [(k, tuple(v.shape)) for k, v in params.items()]
    return shapes, kinds, model


def model_shape(model: str | os.PathLike | dict, quantize: int | None = None,
                group_size: int = 64, dtype: str | None = None) -> ModelShape:
    """Sizes of a base model from its config (a directory, hub id, config.json or dict)."""
    config, path = _read_config(model)
    stored = dtype or _stored_dtype(config, path)
    fbytes = _DTYPE_BYTES[stored]
    preq = config.get("quantization") or config.get("quantization_config")
    bits = quantize
    if preq and isinstance(preq, dict) and preq.get("bits"):
        if quantize:
            raise MindprintError(f"{path or 'config'} is already quantized ({preq}); drop --quantize")
        bits = int(preq["bits"])
        group_size = int(preq.get("group_size", group_size))
    tc = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}

    def get(*keys, default=None):
        for k in keys:
            for src in (config, tc):
                if src.get(k) is not None:
                    return src[k]
        return default

    hidden = int(get("hidden_size", "d_model", "n_embd"))
    layers = int(get("num_hidden_layers", "n_layer", "num_layers"))
    heads = int(get("num_attention_heads", "n_head"))
    kv_heads = int(get("num_key_value_heads", default=heads))
    head_dim = int(get("head_dim", default=hidden // heads) or hidden // heads)
    inter = int(get("intermediate_size", default=4 * hidden))
    vocab = int(get("vocab_size"))
    try:
        shapes, kinds, mdl = _param_shapes(config)
    except Exception:  # noqa: BLE001 - unsupported/odd config: fall back to the formula
        shapes, kinds, mdl = None, {}, None
    linear_dims: dict[str, tuple[int, int]] = {}
    if shapes is None:
        per_layer = (hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
                     + 3 * hidden * inter + 2 * hidden)
        n_params = layers * per_layer + vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
        qbytes = n_params * (bits / 8 + 2 * fbytes / group_size) if bits else n_params * fbytes
        weight_bytes = int(qbytes)
        for name, (i, o) in {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
                             "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden),
                             "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
                             "down_proj": (inter, hidden)}.items():
            linear_dims[name] = (i, o)
    else:
        n_params = sum(math.prod(s) for _, s in shapes)
        weight_bytes = 0
        for k, s in shapes:
            n = math.prod(s)
            mod = k.rsplit(".", 1)[0]
            if bits and k.endswith(".weight") and kinds.get(mod) == "quantizable" \
                    and s[-1] % group_size == 0:
                # packed uint32 weights + one scale and one bias per group, in the float dtype
                weight_bytes += n * bits // 8 + 2 * (n // group_size) * fbytes
            else:
                weight_bytes += n * fbytes
        layer_list = getattr(getattr(mdl, "model", mdl), "layers", None) or getattr(mdl, "layers", [])
        if layer_list:
            import mlx.nn as nn
            for p, m in layer_list[0].named_modules():
                if isinstance(m, nn.Linear):
                    o, i = m.weight.shape
                    linear_dims[p] = (i, o)
    return ModelShape(model_type=config["model_type"], n_params=int(n_params),
                      weight_bytes=int(weight_bytes), dtype_bytes=fbytes, num_layers=layers,
                      hidden=hidden, intermediate=inter, vocab=vocab, num_heads=heads,
                      num_kv_heads=kv_heads, head_dim=head_dim, linear_dims=linear_dims,
                      quantized_bits=bits)


def _lora_params(shape: ModelShape, targets: Sequence[str], rank: int,
                 layers: int | None = None) -> int:
    n = 0
    for t in targets:
        hits = [d for p, d in shape.linear_dims.items() if p == t or p.endswith("." + t)]
        if not hits:
            raise MindprintError(f"LoRA target '{t}' matches no linear layer of a "
                                 f"{shape.model_type} decoder layer (it has: "
                                 f"{', '.join(sorted(p.split('.')[-1] for p in shape.linear_dims))})")
        n += sum(rank * (i + o) for i, o in hits)
    return n * (layers if layers is not None else shape.num_layers)


# Activation coefficients, fitted to mx.get_peak_memory() of real LoRA steps (forward,
# backward, AdamW update; SFT with the LM loss and reward with a scalar head on the trunk)
# on 14 tiny llama shapes (hidden 64-256, 2-8 layers, intermediate 128-1024, 32-256 tokens
# a row), fp32, MLX CPU backend; the fit is within 6% on all of them. Elements kept per
# token per decoder layer: about 6.3 x hidden + 5.5 x intermediate, plus about half a
# (B, heads, T, T) attention array; the attention backward works on about 2.8 such arrays
# at once; outside the layers about 18.6 x hidden per token (embeddings, final norm, the
# residual gradients); the output layer about 2.4 float32 (B, T, vocab) arrays (logits and
# their gradient). With gradient checkpointing each layer keeps only its input and the
# backward pass recomputes about 1.25 layers at a time (measured within 17%).
_PER_TOKEN_HIDDEN = 6.26
_PER_TOKEN_INTER = 5.49
_ATTN_KEPT = 0.56
_ATTN_WORK = 2.83
_OUTSIDE_HIDDEN = 18.6
_LOGITS_F32 = 2.4
_GC_WORKING_LAYERS = 1.25


def _activations(s: ModelShape, batch: int, seq: int, grad_checkpoint: bool,
                 logits: bool, lora_rank: int, n_targets: int) -> int:
    """Bytes a training forward keeps for backward, plus the backward's working set."""
    b = s.dtype_bytes
    tokens = batch * seq
    attn = batch * s.num_heads * seq * seq
    per_token = (_PER_TOKEN_HIDDEN * s.hidden + _PER_TOKEN_INTER * s.intermediate
                 + 2 * n_targets * lora_rank)
    layer = per_token * tokens + _ATTN_KEPT * attn
    if grad_checkpoint:
        kept = s.num_layers * tokens * s.hidden + _GC_WORKING_LAYERS * layer
    else:
        kept = s.num_layers * layer
    total = (kept + _ATTN_WORK * attn + _OUTSIDE_HIDDEN * tokens * s.hidden) * b
    if logits:
        # the loss is computed in float32 whatever the model's dtype
        total += tokens * s.vocab * _LOGITS_F32 * 4
    return int(total)


def kv_cache_bytes(s: ModelShape, batch: int, total_len: int, step: int = 256) -> int:
    padded = ((total_len + step - 1) // step) * step
    return 2 * s.num_layers * batch * s.num_kv_heads * s.head_dim * padded * s.dtype_bytes


def estimate(model: str | os.PathLike | dict | ModelShape, phase: str = "sft", *,
             batch: int = 4, seq_len: int = 512, lora_rank: int = 8,
             targets: Sequence[str] = DEFAULT_TARGETS, quantize: int | None = None,
             grad_checkpoint: bool = False, max_new_tokens: int = 128,
             prompt_len: int | None = None, lora_layers: int | None = None,
             dtype: str | None = None, mini_batch: int | None = None,
             forward_batch: int | None = None, group_size: int = 4) -> MemoryEstimate:
    """Peak memory (bytes) of one phase; see the module docstring for the terms.

    `seq_len` is the training row length (SFT, reward: prompt + completion); PPO rolls out
    `batch` prompts of `prompt_len` tokens (default seq_len - max_new_tokens, at least 1)
    for `max_new_tokens`, then trains on minibatches of `mini_batch` rows (default `batch`)
    of prompt_len + max_new_tokens; its teacher-forced passes over the rollout take
    `forward_batch` rows at a time (default `batch`). GRPO/RLOO: `batch` prompts x
    `group_size` samples, `mini_batch` prompts' groups per micro-batch, `forward_batch` rows
    per no-grad pass (default all). DPO: `batch` pairs of `seq_len` tokens, `mini_batch`
    pairs per micro-batch. DITTO: DPO's settings, sampling `forward_batch` prompts at once
    (its sample_batch_size) for `max_new_tokens`.
    """
    if phase not in PHASES:
        raise MindprintError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
    for name, v in (("batch", batch), ("seq_len", seq_len), ("lora_rank", lora_rank),
                    ("max_new_tokens", max_new_tokens), ("mini_batch", mini_batch or 1),
                    ("forward_batch", forward_batch or 1), ("group_size", group_size)):
        if not isinstance(v, int) or v < 1:
            raise MindprintError(f"{name} must be a positive integer, got {v!r}")
    s = model if isinstance(model, ModelShape) else model_shape(model, quantize=quantize, dtype=dtype)
    notes: list[str] = []
    one = _lora_params(s, targets, lora_rank, lora_layers) * 4        # float32 adapter
    head = (s.hidden + 1) * 4
    kv = 0
    if phase == "sft":
        adapters = one
        trainable = one
        act = _activations(s, batch, seq_len, grad_checkpoint, True, lora_rank, len(targets))
    elif phase == "reward":
        # chosen and rejected rows go through together; the head reads the trunk, no logits
        adapters = one + head
        trainable = one + head
        act = _activations(s, 2 * batch, seq_len, grad_checkpoint, False, lora_rank, len(targets))
    elif phase == "ppo":
        p = prompt_len if prompt_len is not None else max(1, seq_len - max_new_tokens)
        total_len = p + max_new_tokens
        # SFT (frozen) + PPO (trainable) + reward (frozen) adapters, value + reward heads
        adapters = 3 * one + 2 * head
        trainable = one + head
        mb = min(mini_batch or batch, batch)
        fb = min(forward_batch or batch, batch)
        train_act = _activations(s, mb, total_len, grad_checkpoint, True, lora_rank, len(targets))
        kv = kv_cache_bytes(s, batch, total_len)
        # teacher-forced (no-grad) passes: float32 logits, log-softmax and the trunk states
        forward = fb * max_new_tokens * s.vocab * 4 * 3 + fb * total_len * s.hidden * s.dtype_bytes * 4
        roll = max(kv + batch * s.vocab * 4 * 4, forward)
        # rollout buffers kept during the update: tokens, logprobs, ref, values, rewards, adv
        buffers = batch * total_len * 4 * 8
        act = max(train_act, roll - kv) + buffers
        if roll > train_act:
            notes.append("ppo peak: rollout (KV cache)")
        else:
            kv_during_train = 0
            notes.append(f"ppo peak: training step (the rollout's {fmt_bytes(kv)} KV cache is "
                         "freed before it)")
            kv = kv_during_train
    elif phase in ("grpo", "rloo"):
        p = prompt_len if prompt_len is not None else max(1, seq_len - max_new_tokens)
        total_len = p + max_new_tokens
        rows = batch * group_size
        # SFT (frozen) + policy (trainable) + reward (frozen) adapters, the reward head only
        adapters = 3 * one + head
        trainable = one
        mb = min(mini_batch or batch, batch) * group_size
        fb = min(forward_batch or rows, rows)
        train_act = _activations(s, mb, total_len, grad_checkpoint, True, lora_rank, len(targets))
        kv = kv_cache_bytes(s, rows, total_len)
        forward = fb * max_new_tokens * s.vocab * 4 * 3 + fb * total_len * s.hidden * s.dtype_bytes * 4
        roll = max(kv + rows * s.vocab * 4 * 4, forward)
        # rollout buffers kept during the update: tokens, mask, old and ref logprobs, adv
        buffers = rows * total_len * 4 * 6
        act = max(train_act, roll - kv) + buffers
        if roll > train_act:
            notes.append(f"{phase} peak: rollout (KV cache of {rows} rows)")
        else:
            notes.append(f"{phase} peak: training step (the rollout's {fmt_bytes(kv)} KV cache "
                         "is freed before it)")
            kv = 0
    else:
        # DPO and DITTO: SFT (frozen) + policy (trainable); chosen and rejected rows together
        adapters = 2 * one
        trainable = one
        mb = min(mini_batch or batch, batch)
        train_act = _activations(s, 2 * mb, seq_len, grad_checkpoint, True, lora_rank, len(targets))
        # the reference's no-grad pass over all 2 x batch rows: float32 logits, log-softmax
        ref = 2 * batch * seq_len * (s.vocab * 4 * 3 + s.hidden * s.dtype_bytes * 4)
        act = max(train_act, ref)
        if phase == "ditto":
            p = prompt_len if prompt_len is not None else max(1, seq_len - max_new_tokens)
            fb = forward_batch or batch
            kv = kv_cache_bytes(s, fb, p + max_new_tokens)
            roll = kv + fb * s.vocab * 4 * 4
            if roll > act:
                notes.append(f"ditto peak: sampling (KV cache of {fb} rows)")
                act = roll - kv
            else:
                notes.append("ditto peak: DPO step (the samples' KV cache is freed before it)")
                kv = 0
    optimizer = 3 * trainable    # gradient + AdamW first and second moments
    total = s.weight_bytes + adapters + optimizer + act + kv
    return MemoryEstimate(phase=phase, weights=s.weight_bytes, adapters=adapters,
                          optimizer=optimizer, activations=act, kv_cache=kv, total=int(total),
                          notes=notes)


WORKING_SET_FRACTION = 0.75


def working_set_limit(memory_gb: float | None = None) -> tuple[int, str]:
    """(bytes, description): the memory a run may use on this machine.

    macOS/Metal: MLX's `max_recommended_working_set_size`; otherwise 75% of the total RAM.
    `memory_gb`: another machine's RAM (GiB, as Apple counts a "64 GB" Mac), 75% of it.
    """
    if memory_gb is not None:
        if not memory_gb > 0:
            raise MindprintError(f"memory_gb must be positive, got {memory_gb!r}")
        return (int(memory_gb * GiB * WORKING_SET_FRACTION),
                f"{WORKING_SET_FRACTION:.0%} of {memory_gb:g} GiB RAM, --memory-gb")
    import mlx.core as mx

    try:
        if mx.metal.is_available():
            info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
            ws = info.get("max_recommended_working_set_size")
            if ws:
                return int(ws), "Metal max_recommended_working_set_size"
    except Exception:  # noqa: BLE001
        pass
    total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 0
    return int(total * WORKING_SET_FRACTION), "75% of total RAM"


def fmt_bytes(n: int | float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def plan_table(estimates: Sequence[MemoryEstimate], limit: int | None = None) -> str:
    """A markdown table of estimates, one row per phase."""
    cols = ("weights", "adapters", "optimizer", "activations", "kv_cache", "total")
    lines = ["| phase | " + " | ".join(cols) + (" | fits |" if limit else " |"),
             "|---" * (len(cols) + 1 + (1 if limit else 0)) + "|"]
    for e in estimates:
        cells = [fmt_bytes(getattr(e, c)) for c in cols]
        fit = ""
        if limit:
            fit = f" {'yes' if e.total <= limit else 'NO'} ({100 * e.total / limit:.0f}%) |"
        lines.append(f"| {e.phase} | " + " | ".join(cells) + " |" + fit)
    return "\n".join(lines)
