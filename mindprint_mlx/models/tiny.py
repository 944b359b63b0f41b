"""Build tiny, random, real Hugging Face model directories (tests and `mindprint demo`).

(The `mindprint demo` model starts as one of these and is then pretrained on a neutral
market primer: `build_demo_model`, `ensure_demo_model`.)

A directory built here loads through exactly the code path of a downloaded checkpoint:
`mlx_lm.load` and transformers' `AutoModelForCausalLM` / `AutoTokenizer` both read it, and
in fp32 they give the same logits. It holds config.json, model.safetensors (weights drawn
from numpy's PCG64 generator, so the same arguments give byte-identical files), a
byte-level BPE tokenizer trained on `texts`, a chat template (ChatML by default, or one
of the `CHAT_FAMILIES`: a real family's template, special tokens and EOS set) and the
usual tokenizer/generation configs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import MindprintError
from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text, dir_mode

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

# ---------------------------------------------------------------- chat families
#
# Each family's chat template is the text its instruct checkpoints publish in
# tokenizer_config.json, with the parts for features the tiny models never use (tool calls,
# image parts) left out; everything a plain system/user/assistant chat renders is kept
# verbatim. Special tokens get ids 0.. in the listed order (the real checkpoints place them
# elsewhere in their vocabularies; nothing in mindprint depends on where).

QWEN25_TEMPLATE = (   # Qwen/Qwen2.5-*-Instruct, without its `tools` branches
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

LLAMA3_TEMPLATE = (   # meta-llama/Llama-3.1-*-Instruct, without custom/builtin tools and ipython
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}\n"
    "    {%- set date_string = \"26 Jul 2024\" %}\n"
    "{%- endif %}\n"
    "\n"
    "{#- This block extracts the system message, so we can slot it into the right place. #}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "\n"
    "{#- System message #}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "{{- system_message }}\n"
    "{{- \"<|eot_id|>\" }}\n"
    "\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ "
    "message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

GEMMA3_TEMPLATE = (   # google/gemma-3-*-it (complete; image parts never occur here)
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)

SMOLLM2_TEMPLATE = (  # HuggingFaceTB/SmolLM2-*-Instruct (complete)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MISTRAL_TEMPLATE = (  # mistralai/Mistral-7B-Instruct-v0.2 (complete): no system role
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class ChatFamily:
    """A chat layout: special tokens (ids 0.. in this order), the tokenizer's bos/eos/pad/unk,
    the ids that end generation (generation_config.json) and the chat template."""

    special_tokens: tuple[str, ...]
    eos: str                         # tokenizer_config's eos_token
    generation_eos: tuple[str, ...]  # generation_config's eos_token_id, in the family's order
    template: str
    bos: str | None = None
    pad: str | None = None
    unk: str | None = None
    config_eos: tuple[str, ...] | None = None  # config.json's eos_token_id (default: generation_eos)
    add_bos: bool = False            # encode() prepends bos (a BOS post-processor, as the family's)
    phrases: tuple[str, ...] = ()    # template text the tokenizer should learn


CHAT_FAMILIES: dict[str, ChatFamily] = {
    "chatml": ChatFamily(special_tokens=SPECIAL_TOKENS, eos=IM_END, generation_eos=(IM_END,),
                         template=CHAT_TEMPLATE, pad=PAD),
    "qwen2.5": ChatFamily(
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), eos="<|im_end|>",
        generation_eos=("<|im_end|>", "<|endoftext|>"), config_eos=("<|im_end|>",),
        pad="<|endoftext|>", template=QWEN25_TEMPLATE,
        phrases=("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",)),
    "llama3": ChatFamily(
        special_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>",
                        "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                        "<|python_tag|>"),
        bos="<|begin_of_text|>", eos="<|eot_id|>",
        generation_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"), add_bos=True,
        template=LLAMA3_TEMPLATE,
        phrases=("Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n",)),
    "gemma3": ChatFamily(
        special_tokens=("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>",
                        "<end_of_turn>"),
        bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>",
        generation_eos=("<eos>", "<end_of_turn>"), add_bos=True, template=GEMMA3_TEMPLATE,
        phrases=("model\n", "user\n")),
    "smollm2": ChatFamily(
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), bos="<|im_start|>",
        eos="<|im_end|>", pad="<|im_end|>", unk="<|endoftext|>", generation_eos=("<|im_end|>",),
        template=SMOLLM2_TEMPLATE,
        phrases=("You are a helpful AI assistant named SmolLM, trained by Hugging Face",)),
    "mistral": ChatFamily(
        special_tokens=("<unk>", "<s>", "</s>"), bos="<s>", eos="</s>", unk="<unk>",
        generation_eos=("</s>",), add_bos=True, template=MISTRAL_TEMPLATE,
        phrases=("[INST] ", " [/INST]")),
}


def chat_family(name: str) -> ChatFamily:
    if name not in CHAT_FAMILIES:
        raise MindprintError(f"tiny model: chat_template must be one of {', '.join(CHAT_FAMILIES)}, "
                             f"got {name!r}")
    return CHAT_FAMILIES[name]

# mlx-lm's gemma3_text builds its layer pattern from sliding_window_pattern and indexes the
# cache of layer `pattern - 1`, so it needs at least that many layers.
GEMMA3_SLIDING_WINDOW_PATTERN = 6

# The `mindprint demo` model: small enough for a fast demo on two CPU cores. Its tokenizer
# makes every word of the demo texts one token (min_frequency 1; the 4096 target is never
# reached: about 3,550 tokens), as a real model's vocabulary holds its language's common
# words. With fewer whole words (2048 tokens, words seen once split into pieces) the tuned
# model spells unseen answers from pieces and misspells them: on the held-out prompts an
# SFT-only run answered 39% of them in real words, against 93% with whole-word tokens.
DEMO_MODEL_ARGS: dict[str, Any] = {
    "arch": "llama", "seed": 0, "vocab_size": 4096, "min_frequency": 1, "hidden_size": 128,
    "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 256,
    "max_position_embeddings": 1024, "dtype": "float32",
}
# The demo model's pretraining on the neutral market primer (`models.pretrain.pretrain`
# arguments): 50 s of CPU single-threaded (at most that on two idle cores), final loss 0.13.
DEMO_PRETRAIN: dict[str, Any] = {
    "steps": 200, "lr": 3e-3, "seed": 0, "batch_size": 16, "max_len": 128,
    "weight_decay": 0.01, "warmup": 0.05, "min_lr_ratio": 0.1,
}
# Bump when the builder's output changes, so cached demo models are rebuilt.
BUILDER_VERSION = 3

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

def _train_tokenizer(texts: list[str], vocab_size: int,
                     family: ChatFamily = CHAT_FAMILIES["chatml"], min_frequency: int = 2) -> str:
    """tokenizer.json text: byte-level BPE trained on `texts` (deterministic), the family's
    special tokens first; families that prepend BOS get a BOS post-processor. A pair seen
    fewer than `min_frequency` times is not merged (1: every word of `texts` can become
    one token, given a large enough `vocab_size`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=list(family.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # BPE counts are order-independent; sorting only makes that independence obvious.
    tok.train_from_iterator(sorted(texts), trainer=trainer)
    for i, t in enumerate(family.special_tokens):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    if family.add_bos:   # as the family's own tokenizer.json: encode() starts with BOS
        bos = family.bos
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                          special_tokens=[(bos, tok.token_to_id(bos))])])
    return tok.to_str(pretty=True)


def _tokenizer_config(max_len: int, family: ChatFamily = CHAT_FAMILIES["chatml"]) -> dict:
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}
             for i, t in enumerate(family.special_tokens)}
    if family is not CHAT_FAMILIES["chatml"]:
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "added_tokens_decoder": added,
            "bos_token": family.bos,
            "eos_token": family.eos,
            "pad_token": family.pad,
            "unk_token": family.unk,
            "add_bos_token": family.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": False,
            "model_max_length": max_len,
            "padding_side": "right",
            "chat_template": family.template,
        }
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
                  max_position_embeddings: int, dtype: str, sliding_window: int,
                  family: ChatFamily = CHAT_FAMILIES["chatml"]) -> dict:
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
    if family is not CHAT_FAMILIES["chatml"]:
        ids = family.special_tokens.index
        eos = [ids(t) for t in (family.config_eos or family.generation_eos)]
        cfg.update(bos_token_id=ids(family.bos) if family.bos else None,
                   eos_token_id=eos[0] if len(eos) == 1 else eos,
                   pad_token_id=ids(family.pad) if family.pad else None)
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
                max_position_embeddings: int, dtype: str, sliding_window: int,
                n_special: int = len(SPECIAL_TOKENS)) -> None:
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
    min_vocab = n_special + 256
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
                     sliding_window: int = 32, chat_template: str = "chatml",
                     min_frequency: int = 2) -> Path:
    """Write a random `arch` model with a BPE tokenizer trained on `texts` to `out_dir`.

    `vocab_size` is the tokenizer's target size; the model's vocabulary is exactly the
    trained tokenizer's (smaller when `texts` hold too few merges), so every id the model
    can emit decodes. `min_frequency`: the BPE trainer's (1 merges words seen once too, so
    with room in `vocab_size` every word of `texts` is one token, as common words are in a
    real model's vocabulary). gemma3_text gets at least 6 layers (mlx-lm needs a full
    sliding-window pattern); `sliding_window` is used by gemma3_text only. `chat_template`
    picks the tokenizer layout: "chatml" (one EOS, its own pad) or a family of
    `CHAT_FAMILIES` ("qwen2.5", "llama3", "gemma3", "smollm2", "mistral": that family's
    template, special tokens, bos/eos/pad and generation_config EOS set), independent of
    `arch`. Same arguments, same bytes.
    """
    if arch == "gemma3_text":
        num_layers = max(num_layers, GEMMA3_SLIDING_WINDOW_PATTERN)
    if not isinstance(chat_template, str):
        raise MindprintError(f"tiny model: chat_template must be a family name, got {chat_template!r}")
    family = chat_family(chat_template)
    _check_args(arch, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads,
                intermediate_size, max_position_embeddings, dtype, sliding_window,
                len(family.special_tokens))
    texts = default_corpus() if texts is None else _text_list(texts)
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise MindprintError(f"tiny model: min_frequency must be an integer >= 1, got {min_frequency!r}")
    # the template's phrases (role names, headers) are seen often enough to become tokens
    texts = texts + [p for p in family.phrases for _ in range(max(2, min_frequency))]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer_json = _train_tokenizer(texts, vocab_size, family, min_frequency)
    n_tokens = len(json.loads(tokenizer_json)["model"]["vocab"])
    cfg = _model_config(arch, vocab_size=n_tokens, hidden_size=hidden_size,
                        num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                        intermediate_size=intermediate_size,
                        max_position_embeddings=max_position_embeddings, dtype=dtype,
                        sliding_window=sliding_window, family=family)
    weights = _weights(cfg, seed)

    atomic_write_bytes(out / "model.safetensors",
                       safetensors_bytes(weights, dtype, metadata={"format": "pt"}))
    atomic_write_text(out / "tokenizer.json", tokenizer_json)
    atomic_write_json(out / "config.json", cfg)
    atomic_write_json(out / "tokenizer_config.json",
                      _tokenizer_config(max_position_embeddings, family))
    if family is CHAT_FAMILIES["chatml"]:
        atomic_write_json(out / "special_tokens_map.json", {
            "eos_token": IM_END, "pad_token": PAD,
            "additional_special_tokens": [IM_START, ENDOFTEXT]})
        atomic_write_json(out / "generation_config.json", {
            "bos_token_id": None, "eos_token_id": cfg["eos_token_id"],
            "pad_token_id": cfg["pad_token_id"], "do_sample": False})
        return out
    named = {k: v for k, v in (("bos_token", family.bos), ("eos_token", family.eos),
                               ("pad_token", family.pad), ("unk_token", family.unk)) if v}
    atomic_write_json(out / "special_tokens_map.json", {
        **named, "additional_special_tokens": [t for t in family.special_tokens
                                               if t not in named.values()]})
    # The family's EOS set, as its generation_config.json lists it (sampling defaults left out:
    # mindprint passes its own).
    gen_eos = [family.special_tokens.index(t) for t in family.generation_eos]
    atomic_write_json(out / "generation_config.json", {
        "bos_token_id": cfg["bos_token_id"],
        "eos_token_id": gen_eos[0] if len(gen_eos) == 1 else gen_eos,
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


def demo_model(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The demo model `mindprint demo` trains, by the name `demo` (a config's `model: demo`,
    `mindprint generate -m demo`, ...): `ensure_demo_model` with its tokenizer trained on the
    packaged demo curriculum's texts, built once into the cache."""
    from ..data import curriculum_texts
    from ..demo import DEMO_CURRICULUM_DIR

    return ensure_demo_model(cache_dir, texts=curriculum_texts(DEMO_CURRICULUM_DIR),
                             progress=progress)


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
        os.chmod(tmp, dir_mode())   # mkdtemp makes it 0700; the cache is a normal directory
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
