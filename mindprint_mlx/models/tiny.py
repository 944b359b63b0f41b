"""Build tiny, random, real Hugging Face model directories (tests and `mindprint demo`).

(The `mindprint demo` model starts as one of these and is then pretrained on a neutral
market primer: `build_demo_model`, `ensure_demo_model`.)

A directory built here loads through exactly the code path of a downloaded checkpoint:
`mlx_lm.load` and transformers' `AutoModelForCausalLM` / `AutoTokenizer` both read it, and
in fp32 they give the same logits. It holds config.json, model.safetensors (weights drawn
from numpy's PCG64 generator, so the same arguments give byte-identical files), a
byte-level BPE tokenizer trained on `texts`, a ChatML chat template and the usual
tokenizer/generation configs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import MindprintError
from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text

ARCHS = ("llama", "qwen2", "qwen3", "gemma3_text")

# Token ids are fixed by the order the trainer adds special tokens: endoftext=0, im_start=1,
# im_end=2, pad=3. EOS is <|im_end|> (ChatML), PAD is its own token so masking by pad id
# never hides a real end of turn.
ENDOFTEXT, IM_START, IM_END, PAD = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, PAD)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# mlx-lm's gemma3_text builds its layer pattern from sliding_window_pattern and indexes the
# cache of layer `pattern - 1`, so it needs at least that many layers.
GEMMA3_SLIDING_WINDOW_PATTERN = 6

# The `mindprint demo` model: small enough for a fast demo on two CPU cores. A 2048-token
# vocabulary makes most words of the demo texts single tokens, so a short pretraining gives
# whole words (with 1024 the model spells words from pieces and often misspells them).
DEMO_MODEL_ARGS: dict[str, Any] = {
    "arch": "llama", "seed": 0, "vocab_size": 2048, "hidden_size": 128, "num_layers": 4,
    "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 256,
    "max_position_embeddings": 1024, "dtype": "float32",
}
# The demo model's pretraining on the neutral market primer (`models.pretrain.pretrain`
# arguments): 50 s of CPU single-threaded (at most that on two idle cores), final loss 0.13.
DEMO_PRETRAIN: dict[str, Any] = {
    "steps": 200, "lr": 3e-3, "seed": 0, "batch_size": 16, "max_len": 128,
    "weight_decay": 0.01, "warmup": 0.05, "min_lr_ratio": 0.1,
}
# Bump when the builder's output changes, so cached demo models are rebuilt.
BUILDER_VERSION = 2

_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


# ---------------------------------------------------------------- default corpus

def default_corpus() -> list[str]:
    """A few hundred plain English sentences, generated from fixed word lists."""
    people = ["the teacher", "my friend", "a student", "the doctor", "our neighbour",
              "the writer", "a child", "the farmer", "my sister", "the engineer",
              "an old man", "the painter"]
    verbs = ["reads", "writes", "finds", "carries", "explains", "remembers", "paints",
             "builds", "likes", "opens"]
    things = ["a letter", "the book", "a small boat", "the story", "an idea", "the map",
              "a warm coat", "the answer", "a new song", "the garden gate", "a question",
              "the old clock"]
    places = ["in the morning", "near the river", "after dinner", "at the station",
              "under the tree", "before the rain", "in the quiet library", "on the hill"]
    reasons = ["because it matters", "to learn something new", "with great care",
               "without a word", "for the first time", "as always"]
    templates = [
        "{p} {v} {t} {w}.",
        "{P} {v} {t} {r}.",
        "Yesterday {p} {v_past} {t} {w}.",
        "Why does {p} want {t}? It is simple: {r}.",
        "I think {p} {v} {t} {w}, {r}.",
    ]
    past = {"reads": "read", "writes": "wrote", "finds": "found", "carries": "carried",
            "explains": "explained", "remembers": "remembered", "paints": "painted",
            "builds": "built", "likes": "liked", "opens": "opened"}
    out = []
    for i in range(300):
        p, v = people[i % len(people)], verbs[(i * 7) % len(verbs)]
        fields = {"p": p, "P": p[0].upper() + p[1:], "v": v, "v_past": past[v],
                  "t": things[(i * 5) % len(things)], "w": places[(i * 3) % len(places)],
                  "r": reasons[(i * 11) % len(reasons)]}
        out.append(templates[i % len(templates)].format(**fields))
    # Chat words, numbers and punctuation, so chat prompts tokenize compactly.
    out += ["user", "assistant", "system", "Hello! How are you today?",
            "I am fine, thank you. What would you like to talk about?",
            "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024.",
            "Questions, answers; lists - and (notes) \"quoted\" 'words'..."]
    return out


# ---------------------------------------------------------------- tokenizer

def _train_tokenizer(texts: list[str], vocab_size: int) -> str:
    """tokenizer.json text: byte-level BPE trained on `texts` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # BPE counts are order-independent; sorting only makes that independence obvious.
    tok.train_from_iterator(sorted(texts), trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok.to_str(pretty=True)


def _tokenizer_config(max_len: int) -> dict:
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}
             for i, t in enumerate(SPECIAL_TOKENS)}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,            # ChatML models add no BOS (as Qwen does)
        "eos_token": IM_END,
        "pad_token": PAD,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": max_len,
        "padding_side": "right",
        "chat_template": CHAT_TEMPLATE,
    }


# ---------------------------------------------------------------- config

def _model_config(arch: str, *, vocab_size: int, hidden_size: int, num_layers: int,
                  num_heads: int, num_kv_heads: int, intermediate_size: int,
                  max_position_embeddings: int, dtype: str, sliding_window: int) -> dict:
    head_dim = hidden_size // num_heads
    cfg: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": SPECIAL_TOKENS.index(IM_END),
        "pad_token_id": SPECIAL_TOKENS.index(PAD),
        "torch_dtype": dtype,
        "rope_scaling": None,
    }
    # rope keys at the top level: mlx-lm 0.32 reads `rope_theta` there and otherwise falls
    # back to its own per-architecture default; transformers 5 reads both forms.
    if arch == "llama":
        theta = 10000.0
        cfg.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
                   rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False, pretraining_tp=1,
                   tie_word_embeddings=False, rope_theta=theta,
                   rope_parameters={"rope_type": "default", "rope_theta": theta})
    elif arch in ("qwen2", "qwen3"):
        # 10000, not Qwen's 1e6: a theta that differs from mlx-lm's qwen default makes the
        # parity test catch a loader that ignores the config.
        theta = 10000.0
        cfg.update(model_type=arch,
                   architectures=["Qwen2ForCausalLM" if arch == "qwen2" else "Qwen3ForCausalLM"],
                   hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=True,
                   use_sliding_window=False, sliding_window=None, max_window_layers=num_layers,
                   layer_types=["full_attention"] * num_layers, rope_theta=theta,
                   rope_parameters={"rope_type": "default", "rope_theta": theta})
        if arch == "qwen3":
            cfg["attention_bias"] = False
    elif arch == "gemma3_text":
        pattern = GEMMA3_SLIDING_WINDOW_PATTERN
        theta, local_theta = 100000.0, 10000.0
        cfg.update(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
                   hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                   tie_word_embeddings=True, attention_bias=False,
                   query_pre_attn_scalar=head_dim, sliding_window=sliding_window,
                   sliding_window_pattern=pattern,
                   layer_types=["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                for i in range(num_layers)],
                   final_logit_softcapping=None, attn_logit_softcapping=None,
                   rope_theta=theta, rope_local_base_freq=local_theta,
                   rope_parameters={
                       "full_attention": {"rope_type": "default", "rope_theta": theta},
                       "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}})
    return cfg


# ---------------------------------------------------------------- weights

def _weights(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """HF-named fp32 weights. Linear weights ~ N(0, 1/fan_in) so activations and logits
    stay O(1) (logits neither flat nor saturated); output projections are further scaled
    by 1/sqrt(2 * layers) so the residual stream does not grow with depth."""
    rng = np.random.Generator(np.random.PCG64(seed))
    arch = cfg["model_type"]
    H, L, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    D, nq, nkv, ffn = cfg["head_dim"], cfg["num_attention_heads"], \
        cfg["num_key_value_heads"], cfg["intermediate_size"]
    out_scale = 1.0 / np.sqrt(2.0 * L)
    # gemma's RMSNorm multiplies by (1 + weight) in both mlx-lm and transformers:
    # weight 0 is the identity there, weight 1 everywhere else.
    norm_value = 0.0 if arch == "gemma3_text" else 1.0

    def linear(out_dim: int, in_dim: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((out_dim, in_dim)) * (scale / np.sqrt(in_dim))).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return np.full((n,), norm_value, dtype=np.float32)

    w: dict[str, np.ndarray] = {}
    # std 1/sqrt(H): tied output logits come out O(1). (gemma scales the embedded tokens
    # by sqrt(H); its post-attention/post-MLP norms keep the layers' share O(1) anyway.)
    w["model.embed_tokens.weight"] = (rng.standard_normal((V, H)) / np.sqrt(H)).astype(np.float32)
    for i in range(L):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = linear(nq * D, H)
        w[p + "self_attn.k_proj.weight"] = linear(nkv * D, H)
        w[p + "self_attn.v_proj.weight"] = linear(nkv * D, H)
        w[p + "self_attn.o_proj.weight"] = linear(H, nq * D, out_scale)
        if arch == "qwen2":
            for name, n in (("q_proj", nq * D), ("k_proj", nkv * D), ("v_proj", nkv * D)):
                w[p + f"self_attn.{name}.bias"] = (rng.standard_normal(n) * 0.1).astype(np.float32)
        if arch in ("qwen3", "gemma3_text"):
            w[p + "self_attn.q_norm.weight"] = norm(D)
            w[p + "self_attn.k_norm.weight"] = norm(D)
        w[p + "mlp.gate_proj.weight"] = linear(ffn, H)
        w[p + "mlp.up_proj.weight"] = linear(ffn, H)
        w[p + "mlp.down_proj.weight"] = linear(H, ffn, out_scale)
        w[p + "input_layernorm.weight"] = norm(H)
        w[p + "post_attention_layernorm.weight"] = norm(H)
        if arch == "gemma3_text":
            w[p + "pre_feedforward_layernorm.weight"] = norm(H)
            w[p + "post_feedforward_layernorm.weight"] = norm(H)
    w["model.norm.weight"] = norm(H)
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = linear(V, H)
    return w


def _to_bfloat16_bytes(a: np.ndarray) -> bytes:
    """fp32 -> bf16 with round-to-nearest-even (numpy has no bfloat16 dtype)."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2").tobytes()


def safetensors_bytes(arrays: dict[str, np.ndarray], dtype: str = "float32",
                      metadata: dict[str, str] | None = None) -> bytes:
    """Serialize fp32 arrays as a safetensors file in `dtype`, names sorted: the same
    arrays always give the same bytes (written by hand because numpy lacks bfloat16)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
    chunks, offset = [], 0
    for name in sorted(arrays):
        a = arrays[name]
        if dtype == "bfloat16":
            data = _to_bfloat16_bytes(a)
        else:
            data = np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":"), sort_keys=False).encode("utf-8")
    head += b" " * (-len(head) % 8)      # the data section starts 8-byte aligned
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


# ---------------------------------------------------------------- public API

def _check_args(arch: str, vocab_size: int, hidden_size: int, num_layers: int,
                num_heads: int, num_kv_heads: int, intermediate_size: int,
                max_position_embeddings: int, dtype: str, sliding_window: int) -> None:
    if arch not in ARCHS:
        raise MindprintError(f"tiny model: arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    if dtype not in _SAFETENSORS_DTYPES:
        raise MindprintError(f"tiny model: dtype must be one of {', '.join(_SAFETENSORS_DTYPES)}, "
                             f"got {dtype!r}")
    for key, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size),
                       ("num_layers", num_layers), ("num_heads", num_heads),
                       ("num_kv_heads", num_kv_heads), ("intermediate_size", intermediate_size),
                       ("max_position_embeddings", max_position_embeddings),
                       ("sliding_window", sliding_window)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise MindprintError(f"tiny model: {key} must be a positive integer, got {value!r}")
    min_vocab = len(SPECIAL_TOKENS) + 256
    if vocab_size <= min_vocab:
        raise MindprintError(f"tiny model: vocab_size must exceed {min_vocab} (special tokens + "
                             f"256 byte tokens), got {vocab_size}")
    if hidden_size % num_heads:
        raise MindprintError(f"tiny model: hidden_size {hidden_size} is not a multiple of "
                             f"num_heads {num_heads}")
    if (hidden_size // num_heads) % 2:
        raise MindprintError(f"tiny model: head dim {hidden_size // num_heads} must be even (RoPE)")
    if num_heads % num_kv_heads:
        raise MindprintError(f"tiny model: num_heads {num_heads} is not a multiple of "
                             f"num_kv_heads {num_kv_heads}")


def build_tiny_model(out_dir: str | os.PathLike, arch: str = "llama",
                     texts: Iterable[str] | None = None, seed: int = 0, vocab_size: int = 512,
                     hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                     num_kv_heads: int = 2, intermediate_size: int = 128,
                     max_position_embeddings: int = 512, dtype: str = "float32",
                     sliding_window: int = 32) -> Path:
    """Write a random `arch` model with a BPE tokenizer trained on `texts` to `out_dir`.

    `vocab_size` is the tokenizer's target size; the model's vocabulary is exactly the
    trained tokenizer's (smaller when `texts` hold too few merges), so every id the model
    can emit decodes. gemma3_text gets at least 6 layers (mlx-lm needs a full
    sliding-window pattern); `sliding_window` is used by gemma3_text only. Same arguments,
    same bytes.
    """
    if arch == "gemma3_text":
        num_layers = max(num_layers, GEMMA3_SLIDING_WINDOW_PATTERN)
    _check_args(arch, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads,
                intermediate_size, max_position_embeddings, dtype, sliding_window)
    texts = default_corpus() if texts is None else _text_list(texts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer_json = _train_tokenizer(texts, vocab_size)
    n_tokens = len(json.loads(tokenizer_json)["model"]["vocab"])
    cfg = _model_config(arch, vocab_size=n_tokens, hidden_size=hidden_size,
                        num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                        intermediate_size=intermediate_size,
                        max_position_embeddings=max_position_embeddings, dtype=dtype,
                        sliding_window=sliding_window)
    weights = _weights(cfg, seed)

    atomic_write_bytes(out / "model.safetensors",
                       safetensors_bytes(weights, dtype, metadata={"format": "pt"}))
    atomic_write_text(out / "tokenizer.json", tokenizer_json)
    atomic_write_json(out / "config.json", cfg)
    atomic_write_json(out / "tokenizer_config.json", _tokenizer_config(max_position_embeddings))
    atomic_write_json(out / "special_tokens_map.json", {
        "eos_token": IM_END, "pad_token": PAD,
        "additional_special_tokens": [IM_START, ENDOFTEXT]})
    atomic_write_json(out / "generation_config.json", {
        "bos_token_id": None, "eos_token_id": cfg["eos_token_id"],
        "pad_token_id": cfg["pad_token_id"], "do_sample": False})
    return out


def _text_list(texts: Iterable[str]) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise MindprintError("tiny model: texts must be a list of strings, not one string")
    out = list(texts)
    bad = next((i for i, t in enumerate(out) if not isinstance(t, str)), None)
    if bad is not None:
        raise MindprintError(f"tiny model: texts[{bad}] is {type(out[bad]).__name__}, not str")
    if not any(t.strip() for t in out):
        raise MindprintError("tiny model: texts is empty; a tokenizer needs some text to learn from")
    return out


def demo_model_key(texts: Iterable[str] | None = None, pretrained: bool = True) -> str:
    """Hash of everything that decides the demo model's bytes: builder version, model
    arguments, tokenizer texts and, when pretrained, the corpus and pretraining settings."""
    texts = default_corpus() if texts is None else _text_list(texts)
    spec: dict[str, Any] = {"builder": BUILDER_VERSION, "args": DEMO_MODEL_ARGS}
    if pretrained:
        spec["pretrain"] = DEMO_PRETRAIN
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    for t in texts:
        h.update(hashlib.sha256(t.encode("utf-8")).digest())
    if pretrained:
        from ..demo.neutral_corpus import neutral_pairs

        h.update(b"corpus")
        for q, a in neutral_pairs():
            h.update(hashlib.sha256(json.dumps([q, a]).encode("utf-8")).digest())
    return h.hexdigest()[:16]


def build_demo_model(out_dir: str | os.PathLike, texts: Iterable[str] | None = None,
                     pretrained: bool = True, progress: bool = True) -> Path:
    """The demo model in `out_dir`: the tiny llama of DEMO_MODEL_ARGS and, when `pretrained`,
    its tokenizer trained on `texts` + the neutral market primer and every weight trained on
    the primer's Q&A pairs (DEMO_PRETRAIN, deterministic), so it answers in real words and a
    neutral voice. `pretrained=False` is the random model (the tokenizer on `texts` only)."""
    texts = default_corpus() if texts is None else _text_list(texts)
    if not pretrained:
        return build_tiny_model(out_dir, texts=texts, **DEMO_MODEL_ARGS)
    from ..demo.neutral_corpus import neutral_pairs, neutral_texts
    from .pretrain import pretrain, write_pretrain_record

    out = build_tiny_model(out_dir, texts=texts + neutral_texts(), **DEMO_MODEL_ARGS)
    stats = pretrain(out, neutral_pairs(), progress=progress, **DEMO_PRETRAIN)
    write_pretrain_record(out, {**DEMO_PRETRAIN, "corpus": "mindprint_mlx.demo.neutral_corpus"},
                          stats)
    return out


def ensure_demo_model(cache_dir: str | os.PathLike | None = None,
                      texts: Iterable[str] | None = None, pretrained: bool = True,
                      progress: bool = True) -> Path:
    """The `mindprint demo` model (`build_demo_model`), built once into
    `<cache>/tiny-demo-<hash>` (the first build pretrains it: under a minute on two CPU
    cores, with a progress line on stderr).

    cache: `cache_dir`, else `$MINDPRINT_CACHE`, else `~/.cache/mindprint`. The model is
    built in a temporary directory and renamed into place, so the path exists only when
    complete; a concurrent builder that loses the race discards its copy.
    """
    texts = default_corpus() if texts is None else _text_list(texts)
    base = Path(cache_dir if cache_dir is not None
                else os.environ.get("MINDPRINT_CACHE") or Path.home() / ".cache" / "mindprint")
    base = base.expanduser()
    name = "tiny-demo" if pretrained else "tiny-demo-random"
    target = base / f"{name}-{demo_model_key(texts, pretrained)}"
    if (target / "config.json").is_file():
        return target
    try:
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=base))
    except OSError as e:
        raise MindprintError(f"cannot create the model cache in {base}: {e.strerror} "
                             "(set MINDPRINT_CACHE to a writable directory)") from None
    try:
        build_demo_model(tmp, texts=texts, pretrained=pretrained, progress=progress)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first (the target is a non-empty directory): use its
            # identical copy.
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
