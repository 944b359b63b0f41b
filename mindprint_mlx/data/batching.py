"""Tokens, masks and batches: the one token layout every trainer uses.

A row is `apply_chat_template(prompt, add_generation_prompt=True)`, then the completion's
tokens and the token the template ends an assistant turn with (`turn_end_id`: <|im_end|>,
<|eot_id|>, Gemma's <end_of_turn>, Mistral's </s>), right-padded with the pad id (never that
token, so padding cannot hide a real end of turn). A system message goes where the template
puts it; a template without a system role (Mistral's) gets the system text prepended to the
first user turn, separated by a blank line (`chat_messages`). The loss mask covers the completion and its EOS only, in the token axis: the
target at position t is predicted from position t-1, so a loss over `logits[:, :-1]` uses
`mask[:, 1:]`.
"""

from __future__ import annotations

import logging
import weakref
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


# What a tokenizer's template does, probed once per tokenizer (weakly keyed: a tokenizer that
# goes away takes its entry with it).
_PROBES: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_PROBE = "mindprintprobe"


def _probe(tokenizer, key: str, fn: Callable[[], Any]) -> Any:
    try:
        cache = _PROBES.setdefault(tokenizer, {})
    except TypeError:            # not weak-referenceable: probe every time
        return fn()
    if key not in cache:
        cache[key] = fn()
    return cache[key]


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str | None:
    """The template's text for `messages`, or None when the template rejects them."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception:   # jinja2's TemplateError from raise_exception, or a template bug
        return None


def template_has_system_role(tokenizer) -> bool:
    """Whether the chat template renders a system message (Gemma 3's folds it into the first
    user turn itself, which counts); Mistral's raises on one."""
    def probe() -> bool:
        text = _render(tokenizer, [{"role": "system", "content": _PROBE},
                                   {"role": "user", "content": "hi"}], True)
        return text is not None and _PROBE in text
    return _probe(tokenizer, "system", probe)


def chat_messages(tokenizer, messages) -> list[dict]:
    """`messages` laid out for the tokenizer's template: a leading system message stays where
    it is when the template has a system role, and is otherwise prepended to the first user
    turn ("<system>\n\n<user>"), the layout Gemma 3's template uses for its own system
    messages; a system message with no user turn after it becomes the first user turn."""
    msgs = as_messages(messages)
    if not msgs or msgs[0].get("role") != "system" or template_has_system_role(tokenizer):
        return msgs
    system, rest = msgs[0]["content"], msgs[1:]
    if rest and rest[0].get("role") == "user":
        return [{**rest[0], "content": f"{system}\n\n{rest[0]['content']}"}] + rest[1:]
    return [{"role": "user", "content": system}] + rest


def encode_prompt(tokenizer, messages) -> list[int]:
    """The prompt's tokens through the tokenizer's own chat template, ready for the answer."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise MindprintError("the tokenizer has no chat template; mindprint needs one to lay out "
                             "prompts (use an instruct/chat model or add `chat_template` to "
                             "tokenizer_config.json)")
    messages = chat_messages(tokenizer, messages)
    return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise MindprintError("the tokenizer has no eos_token_id")
    return int(eos)


def _listed_eos(tokenizer) -> set[int]:
    """`eos_token_ids` as a set: mlx-lm's wrapper has a set, a transformers tokenizer may
    have an int or nothing."""
    ids = getattr(tokenizer, "eos_token_ids", None)
    if ids is None:
        return set()
    return {int(ids)} if isinstance(ids, int) else {int(i) for i in ids}


def turn_end_id(tokenizer) -> int:
    """The token the chat template closes an assistant turn with, which SFT rows end with and
    generation stops at: the first token after the assistant's text when the template renders
    one, if it is an EOS id or a special token (Gemma 3's <end_of_turn>, where eos_token is
    <eos>); else the tokenizer's eos_token_id."""
    def probe() -> int:
        eos = eos_id(tokenizer)
        if getattr(tokenizer, "chat_template", None) is None:
            return eos
        text = _render(tokenizer, [{"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": _PROBE}], False)
        if text is None or _PROBE not in text:
            return eos
        tail = _ids(tokenizer.encode(text[text.rindex(_PROBE) + len(_PROBE):],
                                     add_special_tokens=False))
        if not tail:
            return eos
        ends = _listed_eos(tokenizer) | {eos}
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        special = tail[0] in added and getattr(added[tail[0]], "special", False)
        return int(tail[0]) if tail[0] in ends or special else eos
    return _probe(tokenizer, "turn_end", probe)


def eos_ids(tokenizer) -> list[int]:
    """Every id that ends generation: the generation config's EOS set (mlx-lm's tokenizer
    wrapper reads it), the tokenizer's eos_token_id and the template's turn end."""
    return sorted(_listed_eos(tokenizer) | {eos_id(tokenizer), turn_end_id(tokenizer)})


def pad_id(tokenizer) -> int:
    """The pad id; falls back to a token that is neither EOS nor the turn end when the
    tokenizer has none (or pads with one of those)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    eos = eos_id(tokenizer)
    if pad is None or int(pad) in (eos, turn_end_id(tokenizer)):
        # Any id works for padding as long as masks (not the id) decide what counts; avoid
        # EOS so a pad is never mistaken for an end of turn.
        avoid = {eos, turn_end_id(tokenizer)}
        pad = next(i for i in range(len(avoid) + 1) if i not in avoid)
    return int(pad)


def encode_completion(tokenizer, completion: str) -> list[int]:
    """The completion's tokens followed by the turn's end token (`turn_end_id`)."""
    return _ids(tokenizer.encode(completion, add_special_tokens=False)) + [turn_end_id(tokenizer)]


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


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int,
             pad_to_multiple: int = 1) -> tuple[mx.array, mx.array]:
    """Right-pad `rows` into tokens (B, T) int32 and their lengths (B,) int32. T is the longest
    row, rounded up to `pad_to_multiple` (fewer distinct shapes, fewer recompilations of a
    compiled step)."""
    if not rows:
        raise MindprintError("pad_rows: empty batch")
    T = max(len(r) for r in rows)
    if pad_to_multiple > 1:
        T = -(-T // pad_to_multiple) * pad_to_multiple
    tokens = np.full((len(rows), T), pad_id, dtype=np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    return mx.array(tokens), mx.array(np.array([len(r) for r in rows], dtype=np.int32))


def pad_batch(rows: Sequence[Sequence[int]], n_prompt: Sequence[int], pad_id: int,
              pad_to_multiple: int = 1) -> tuple[mx.array, mx.array]:
    """Right-pad `rows` into tokens (B, T) int32 and the completion mask (B, T) float32.

    mask[i, t] = 1 for n_prompt[i] <= t < len(rows[i]); T as in `pad_rows`.
    """
    if len(rows) != len(n_prompt):
        raise MindprintError(f"pad_batch: {len(rows)} rows but {len(n_prompt)} prompt lengths")
    tokens, lengths = pad_rows(rows, pad_id, pad_to_multiple)
    pos = mx.arange(tokens.shape[1])[None, :]
    mask = (pos >= mx.array(list(n_prompt), dtype=mx.int32)[:, None]) & (pos < lengths[:, None])
    return tokens, mask.astype(mx.float32)


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
