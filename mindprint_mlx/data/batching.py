"""Tokens, masks and batches: the one token layout every trainer uses.

A row is `apply_chat_template(prompt, add_generation_prompt=True)`, then the completion's
tokens and EOS, right-padded with the pad id (never EOS, so padding cannot hide a real end
of turn). The loss mask covers the completion and its EOS only, in the token axis: the
target at position t is predicted from position t-1, so a loss over `logits[:, :-1]` uses
`mask[:, 1:]`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Iterator, Sequence

import mlx.core as mx
import numpy as np

from ..errors import MindprintError

log = logging.getLogger(__name__)


def as_messages(prompt: Any) -> list[dict]:
    """A prompt as chat messages: a string is one user message."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, dict):
        return [dict(prompt)]
    return [dict(m) for m in prompt]


def _ids(x: Any) -> list[int]:
    # transformers may hand back a BatchEncoding-like mapping instead of a list.
    if hasattr(x, "keys") and "input_ids" in x:
        x = x["input_ids"]
    if hasattr(x, "tolist"):
        x = x.tolist()
    if x and isinstance(x[0], list):
        x = x[0]
    return [int(i) for i in x]


def encode_prompt(tokenizer, messages) -> list[int]:
    """The prompt's tokens through the tokenizer's own chat template, ready for the answer."""
    messages = as_messages(messages)
    if getattr(tokenizer, "chat_template", None) is None:
        raise MindprintError("the tokenizer has no chat template; mindprint needs one to lay out "
                             "prompts (use an instruct/chat model or add `chat_template` to "
                             "tokenizer_config.json)")
    return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise MindprintError("the tokenizer has no eos_token_id")
    return int(eos)


def pad_id(tokenizer) -> int:
    """The pad id; falls back to a token that is not EOS when the tokenizer has none."""
    pad = getattr(tokenizer, "pad_token_id", None)
    eos = eos_id(tokenizer)
    if pad is None or int(pad) == eos:
        # Any id works for padding as long as masks (not the id) decide what counts; avoid
        # EOS so a pad is never mistaken for an end of turn.
        pad = 0 if eos != 0 else 1
    return int(pad)


def encode_completion(tokenizer, completion: str) -> list[int]:
    """The completion's tokens followed by EOS."""
    return _ids(tokenizer.encode(completion, add_special_tokens=False)) + [eos_id(tokenizer)]


def encode_pair(tokenizer, messages, completion: str, max_len: int) -> tuple[list[int], int, bool]:
    """(tokens, n_prompt, truncated) for one prompt and completion.

    Rows longer than `max_len` are cut, and `truncated` says so (callers count and warn):
    the completion's tail goes first; a prompt too long to leave room for a quarter of
    `max_len` of answer loses its beginning (the part furthest from the answer).
    """
    if max_len < 2:
        raise MindprintError(f"max_len must be at least 2, got {max_len}")
    prompt = encode_prompt(tokenizer, messages)
    comp = encode_completion(tokenizer, completion)
    if len(prompt) + len(comp) <= max_len:
        return prompt + comp, len(prompt), False
    keep_comp = min(len(comp), max(1, max_len // 4))
    if len(prompt) > max_len - keep_comp:
        prompt = prompt[len(prompt) - (max_len - keep_comp):]
    comp = comp[:max_len - len(prompt)]
    return prompt + comp, len(prompt), True


def encode_records(tokenizer, pairs: Iterable[tuple[Any, str]], max_len: int,
                   what: str = "records") -> tuple[list[tuple[list[int], int]], int]:
    """([(tokens, n_prompt)], n_truncated) for (prompt, completion) pairs; truncations are
    counted and logged, never silent."""
    out, n_cut = [], 0
    for prompt, completion in pairs:
        tokens, n_prompt, cut = encode_pair(tokenizer, prompt, completion, max_len)
        out.append((tokens, n_prompt))
        n_cut += cut
    if n_cut:
        log.warning("%d of %d %s were longer than max_len=%d tokens and were truncated "
                    "(raise max_len to keep them whole)", n_cut, len(out), what, max_len)
    return out, n_cut


def pad_batch(rows: Sequence[Sequence[int]], n_prompt: Sequence[int], pad_id: int,
              pad_to_multiple: int = 1) -> tuple[mx.array, mx.array]:
    """Right-pad `rows` into tokens (B, T) int32 and the completion mask (B, T) float32.

    mask[i, t] = 1 for n_prompt[i] <= t < len(rows[i]). T is the longest row, rounded up
    to `pad_to_multiple` (fewer distinct shapes, fewer recompilations of a compiled step).
    """
    if len(rows) != len(n_prompt):
        raise MindprintError(f"pad_batch: {len(rows)} rows but {len(n_prompt)} prompt lengths")
    if not rows:
        raise MindprintError("pad_batch: empty batch")
    T = max(len(r) for r in rows)
    if pad_to_multiple > 1:
        T = -(-T // pad_to_multiple) * pad_to_multiple
    tokens = np.full((len(rows), T), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), T), dtype=np.float32)
    for i, (r, p) in enumerate(zip(rows, n_prompt)):
        tokens[i, :len(r)] = r
        mask[i, p:len(r)] = 1.0
    return mx.array(tokens), mx.array(mask)


def item_length(item: Any) -> int:
    """Length of a batching item: a token list, or a tuple whose first element is one."""
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], (list, tuple)):
        return len(item[0])
    if hasattr(item, "tokens"):
        return len(item.tokens)
    try:
        return len(item)
    except TypeError:
        return 0


def batch_order(lengths: Sequence[int], batch_size: int, seed: int, shuffle: bool = True,
                sort_by_length: bool = True) -> list[list[int]]:
    """Index lists of the batches of one pass (see `batches`)."""
    if batch_size < 1:
        raise MindprintError(f"batch_size must be >= 1, got {batch_size}")
    n = len(lengths)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(n) if shuffle else np.arange(n)
    if sort_by_length:
        # Stable sort of a shuffled order: equal lengths land in a seeded random order.
        idx = idx[np.argsort(np.asarray(lengths, dtype=np.int64)[idx], kind="stable")]
    groups = [idx[i:i + batch_size].tolist() for i in range(0, n, batch_size)]
    if shuffle:
        groups = [groups[j] for j in rng.permutation(len(groups))]
    return groups


def batches(items: Sequence[Any], batch_size: int, seed: int, shuffle: bool = True,
            sort_by_length: bool = True,
            length: Callable[[Any], int] = item_length) -> Iterator[list[Any]]:
    """Batches of `items` for one pass, deterministic for a seed (pass seed + epoch).

    With `sort_by_length` rows of similar length share a batch (little padding) and the
    batches come in a seeded random order; the last batch may be smaller.
    """
    items = list(items)
    for group in batch_order([length(x) for x in items], batch_size, seed, shuffle, sort_by_length):
        yield [items[i] for i in group]
