"""Quick inference checks: chat-templated generation with and without adapters."""

from __future__ import annotations

import shutil
import textwrap
from typing import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn

from .models import lora


def chat_prompt(tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of `prompt` as a user turn, rendered with the tokenizer's chat template."""
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        from .data.batching import encode_prompt

        return encode_prompt(tokenizer, messages)
    return list(tokenizer.encode(prompt))


def generate_text(model: nn.Module, tokenizer, prompt: str, max_tokens: int = 128,
                  temp: float = 0.7, top_p: float = 1.0, seed: int = 0,
                  system: str | None = None,
                  on_text: Callable[[str], None] | None = None) -> str:
    """Generate one answer with mlx-lm's streaming generator (and its KV cache)."""
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    mx.random.seed(seed)
    sampler = make_sampler(temp=temp, top_p=top_p if top_p < 1.0 else 0.0)
    parts = []
    for resp in stream_generate(model, tokenizer, chat_prompt(tokenizer, prompt, system),
                                max_tokens=max_tokens, sampler=sampler):
        parts.append(resp.text)
        if on_text is not None:
            on_text(resp.text)
    return "".join(parts)


def compare_answers(model: nn.Module, tokenizer, prompt: str, adapters: Sequence[str],
                    **kwargs) -> tuple[str, str]:
    """(base answer, adapted answer) for the same prompt and seed."""
    with lora.active_adapters(model, []):
        base = generate_text(model, tokenizer, prompt, **kwargs)
    with lora.active_adapters(model, list(adapters)):
        tuned = generate_text(model, tokenizer, prompt, **kwargs)
    return base, tuned


def side_by_side(left: str, right: str, titles=("base", "adapted"), width: int | None = None) -> str:
    width = width or shutil.get_terminal_size((120, 24)).columns
    col = max(20, (width - 3) // 2)

    def wrap(t: str) -> list[str]:
        lines = []
        for para in t.splitlines() or [""]:
            lines.extend(textwrap.wrap(para, col) or [""])
        return lines

    a, b = wrap(left), wrap(right)
    rows = [f"{titles[0]:<{col}} | {titles[1]}", f"{'-' * col}-+-{'-' * col}"]
    for i in range(max(len(a), len(b))):
        rows.append(f"{(a[i] if i < len(a) else ''):<{col}} | {b[i] if i < len(b) else ''}")
    return "\n".join(rows)
