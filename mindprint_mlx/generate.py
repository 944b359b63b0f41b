"""Quick inference checks: chat-templated generation with and without adapters."""

from __future__ import annotations

import shutil
import textwrap
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn


def chat_prompt(tokenizer, prompt: Any, system: str | None = None) -> list[int]:
    """Token ids of `prompt` through the tokenizer's chat template, ready for the answer (the
    layout training uses, `data.batching.encode_prompt`): a string is a user turn (after a
    `system` message, when given), chat messages go as they are. A tokenizer without a chat
    template gets the plain text of a string prompt."""
    from .data.batching import as_messages, encode_prompt

    if isinstance(prompt, str):
        if not getattr(tokenizer, "chat_template", None):
            return list(tokenizer.encode(prompt))
        prompt = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": prompt}]
    return encode_prompt(tokenizer, as_messages(prompt))


def generate_text(model: nn.Module, tokenizer, prompt: Any, max_tokens: int = 128,
                  temp: float = 0.7, top_p: float = 1.0, seed: int = 0,
                  system: str | None = None,
                  on_text: Callable[[str], None] | None = None) -> str:
    """One answer to `prompt` (a user message, or chat messages; see `chat_prompt`) with
    mlx-lm's streaming generator and its KV cache, with the model's active adapters; greedy
    at temp 0. `on_text` gets each piece of text as it comes."""
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
