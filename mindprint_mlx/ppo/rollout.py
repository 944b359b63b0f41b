"""Rollouts: batched sampling with a KV cache, then teacher-forced log-probabilities and values.

Sampling runs on left-padded prompts in one batched KV cache (mlx-lm's BatchKVCache, whose
per-row RoPE offsets put every prompt's first real token at position 0). The sampler keeps
each sampled token's log-probability (and, given a value head, the value read from the same
hidden state), which equal what teacher forcing on right-padded rows computes up to float
noise (fp32: < 1e-5 measured, tests/test_ppo_rollout.py), so PPO can use them as the old
log-probabilities and values without a second policy pass, and the first minibatch's ratio
is still 1 up to float noise. `response_forward` is the teacher-forced
pass (the reference, the update, and the policy's old log-probs where a low-precision base
makes the two paths differ more). Every log-probability, old, reference and new, comes
from logits / T.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import distributed as dist
from ..errors import MindprintError
from ..models.heads import hidden_states, lm_logits


@dataclass
class Generation:
    """Sampled responses, right-padded; everything after the first EOS is padding."""

    tokens: mx.array            # (B, L) int32: prompt + response, right-padded with pad id
    prompt_lengths: mx.array    # (B,) int32
    response_tokens: mx.array   # (B, R) int32, pad after the response
    response_mask: mx.array     # (B, R) float32: 1 on response tokens, EOS included
    response_lengths: mx.array  # (B,) int32, EOS included
    ended: mx.array             # (B,) bool: the response ends in EOS
    sample_logprobs: mx.array   # (B, R) float32: log p(token) at sampling time, from logits / T
    sample_values: mx.array | None = None   # (B, R) float32: the value head at sampling time

    @property
    def lengths(self) -> mx.array:
        """Length of prompt + response per row (what a reward model reads up to)."""
        return self.prompt_lengths + self.response_lengths


def activation_dtype(model: nn.Module) -> mx.Dtype:
    """The dtype the trunk computes in: its embedding's (a quantized one's scales')."""
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    w = getattr(emb, "scales", None) if isinstance(emb, nn.QuantizedEmbedding) else getattr(emb, "weight", None)
    return w.dtype if w is not None else mx.float32


OLD_LOGPROBS = ("auto", "rollout", "forward")


def keep_sampler_logprobs(mode: str, model: nn.Module) -> bool:
    """Where a trainer's old log-probs (and PPO's old values) come from, for its
    `old_logprobs` setting: "rollout" keeps what the sampler computed (no second policy
    pass; equal to teacher forcing up to float noise, bit-equal on the CPU backend in fp32
    and bf16), "forward" recomputes them by teacher forcing, "auto" is rollout except for a
    bf16/fp16 trunk on a GPU (whose decode and full-sequence kernels round differently).
    True = keep the sampler's."""
    if mode not in OLD_LOGPROBS:
        raise MindprintError(f"old_logprobs: {mode!r} is not one of {', '.join(OLD_LOGPROBS)}")
    return mode == "rollout" or (mode == "auto" and (mx.default_device().type != mx.gpu
                                                     or activation_dtype(model) == mx.float32))


def _batch_cache(model: nn.Module, left_padding: list[int]) -> list:
    """One batched KV cache per layer (mlx-lm's own per-architecture caches, merged)."""
    from mlx_lm.models.cache import make_prompt_cache

    rows = [make_prompt_cache(model) for _ in left_padding]
    try:
        cache = [c.merge([row[i] for row in rows]) for i, c in enumerate(rows[0])]
    except (AttributeError, ValueError, NotImplementedError) as e:
        raise MindprintError(f"{type(model).__module__}: its KV cache does not support batched "
                             f"generation ({e})") from None
    for c in cache:
        c.prepare(left_padding=left_padding)
    return cache


def _sample(logits: mx.array, temperature: float, top_p: float, noise: mx.array) -> tuple[mx.array, mx.array]:
    """Sample one token per row from softmax(logits / T), optionally from the top-p nucleus,
    by the Gumbel-max trick with the given (rows, V) Gumbel noise; temperature 0 is greedy.

    Returns (tokens (B,), log p(token) under the full tempered distribution (B,))."""
    if temperature <= 0:     # greedy (evaluation): the argmax, its log p at T = 1
        logprobs = logits.astype(mx.float32)
        logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
        tokens = mx.argmax(logprobs, axis=-1)
        return tokens, mx.take_along_axis(logprobs, tokens[:, None], axis=-1).squeeze(-1)
    logprobs = logits.astype(mx.float32) / temperature
    logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
    sample_from = logprobs
    if top_p < 1.0:
        order = mx.argsort(-logprobs, axis=-1)
        sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
        cum = mx.cumsum(mx.exp(sorted_lp), axis=-1)
        keep_sorted = (cum - mx.exp(sorted_lp)) < top_p       # always keeps the top token
        keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
        sample_from = mx.where(keep, logprobs, -mx.inf)
    tokens = mx.argmax(sample_from + noise, axis=-1)
    return tokens, mx.take_along_axis(logprobs, tokens[:, None], axis=-1).squeeze(-1)


def generate_batch(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   eos_ids: Sequence[int], pad_id: int, temperature: float = 1.0,
                   top_p: float = 1.0, key: mx.array | None = None,
                   value_head: nn.Module | None = None,
                   draw: tuple[Sequence[int], int] | None = None) -> Generation:
    """Sample responses for a batch of token prompts with one batched KV cache.

    With a `value_head`, the value of every response position is read from the hidden
    state that predicts its token (as `response_forward` reads it): `sample_values`.

    A row that emits an EOS leaves the batch (its cache rows are dropped, as mlx-lm's batch
    generation does); sampling stops when every row is done or after `max_new_tokens`.
    Each (step, row) draws its own noise, so a row's tokens do not depend on when others end.

    draw: (rows, n): these prompts are rows `rows` of a batch of `n` (a data-parallel rank's
    share, `distributed.shard`); each takes its row of the (n, V) noise the whole batch
    would draw at every token, so the ranks' responses together are the ones one process
    samples for the whole batch with the same key. Default: rows 0..B-1 of B.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise MindprintError("generate_batch needs non-empty prompts")
    if temperature < 0:
        raise MindprintError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if max_new_tokens < 1:
        raise MindprintError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    key = mx.random.key(0) if key is None else key
    keys = mx.random.split(key, max_new_tokens)
    B = len(prompts)
    rows, n_draw = (None, B) if draw is None else (np.asarray(draw[0], dtype=np.int32), int(draw[1]))
    if rows is not None and (len(rows) != B or rows.min() < 0 or rows.max() >= n_draw):
        raise MindprintError(f"generate_batch: draw rows {rows.tolist()} do not fit {B} prompts "
                             f"of a batch of {n_draw}")
    P = max(len(p) for p in prompts)
    left = [P - len(p) for p in prompts]
    x = mx.array([[pad_id] * l + list(p) for l, p in zip(left, prompts)], dtype=mx.int32)
    cache = _batch_cache(model, left)
    eos = np.array(sorted(set(int(e) for e in eos_ids)))
    sampled = np.full((B, max_new_tokens), pad_id, dtype=np.int32)
    sample_lps = np.zeros((B, max_new_tokens), dtype=np.float32)
    sample_vals = np.zeros((B, max_new_tokens), dtype=np.float32) if value_head is not None else None
    active = np.arange(B)
    # the rows of the (n_draw, V) noise that the active rows take; None: all of it, in order
    noise_rows = None if rows is None else mx.array(rows)

    def step(inputs: mx.array, i: int, take: mx.array | None):
        h = hidden_states(model, inputs, cache=cache)[:, -1:, :]
        logits = lm_logits(model, h)[:, -1, :]
        if temperature <= 0:
            y, lp = _sample(logits, 0.0, 1.0, None)
        else:
            noise = mx.random.gumbel((n_draw, logits.shape[-1]), key=keys[i])
            y, lp = _sample(logits, temperature, top_p, noise if take is None else noise[take])
        # one (rows, 2) array: the sampled token's log p and the value, fetched in one copy
        aux = lp[:, None] if value_head is None else mx.stack([lp, value_head(h)[:, -1]], axis=1)
        return y, aux

    y, lp = step(x, 0, noise_rows)
    mx.async_eval(y, lp)
    n_steps = 0
    for i in range(max_new_tokens):
        if i + 1 < max_new_tokens:
            y_next, lp_next = step(y[:, None], i + 1, noise_rows)   # queued before we wait on y
            mx.async_eval(y_next, lp_next)
        y_np, aux_np = np.array(y), np.array(lp)
        sampled[active, i] = y_np
        sample_lps[active, i] = aux_np[:, 0]
        if sample_vals is not None:
            sample_vals[active, i] = aux_np[:, 1]
        n_steps = i + 1
        finished = np.isin(y_np, eos)
        if finished.all() or i + 1 == max_new_tokens:
            break
        if finished.any():
            keep = np.nonzero(~finished)[0]
            keep_mx = mx.array(keep.astype(np.int32))
            for c in cache:
                c.filter(keep_mx)
            y_next, lp_next = y_next[keep_mx], lp_next[keep_mx]
            active = active[keep]
            noise_rows = mx.array((active if rows is None else rows[active]).astype(np.int32))
        y, lp = y_next, lp_next
    return _finish(prompts, sampled[:, :n_steps], sample_lps[:, :n_steps], eos, pad_id,
                   None if sample_vals is None else sample_vals[:, :n_steps])


def _finish(prompts, sampled: np.ndarray, sample_lps: np.ndarray, eos: np.ndarray,
            pad_id: int, sample_vals: np.ndarray | None = None) -> Generation:
    """Cut each row after its first EOS, right-pad, and build the teacher-forcing rows."""
    B, R = sampled.shape
    is_eos = np.isin(sampled, eos)
    ended = is_eos.any(axis=1)
    resp_len = np.where(ended, is_eos.argmax(axis=1) + 1, R).astype(np.int32)
    mask = (np.arange(R)[None, :] < resp_len[:, None])
    resp = np.where(mask, sampled, pad_id).astype(np.int32)
    plen = np.array([len(p) for p in prompts], dtype=np.int32)
    L = int(plen.max()) + R
    rows = np.full((B, L), pad_id, dtype=np.int32)
    for b, p in enumerate(prompts):
        rows[b, :plen[b]] = p
        rows[b, plen[b]:plen[b] + resp_len[b]] = resp[b, :resp_len[b]]
    return Generation(tokens=mx.array(rows), prompt_lengths=mx.array(plen),
                      response_tokens=mx.array(resp), response_mask=mx.array(mask.astype(np.float32)),
                      response_lengths=mx.array(resp_len), ended=mx.array(ended),
                      sample_logprobs=mx.array(np.where(mask, sample_lps, 0.0).astype(np.float32)),
                      sample_values=None if sample_vals is None else
                      mx.array(np.where(mask, sample_vals, 0.0).astype(np.float32)))


def gather_generation(gen: Generation, arrays: dict[str, mx.array | None],
                      pad_id: int) -> tuple[Generation, dict[str, mx.array | None]]:
    """The whole data-parallel batch on every rank: every rank's rows of `gen` and of
    `arrays` ((B, R) per response token, e.g. log-probs, padded with 0; or (B,), e.g.
    scores), in the order `distributed.shard` dealt the prompts, and laid out as one
    process's `generate_batch` lays out the whole batch (the longest prompt plus the
    longest response of any rank). On one process: unchanged. Call it on every rank."""
    if dist.size() == 1:
        return gen, arrays
    P, R = (int(v) for v in dist.gather(mx.array(
        [int(gen.prompt_lengths.max()), gen.response_tokens.shape[1]], dtype=mx.int32)).max(axis=0).tolist())

    def per_token(x: mx.array | None, fill=0) -> mx.array | None:
        return None if x is None else dist.gather_rows(x, R, fill)

    whole = Generation(tokens=dist.gather_rows(gen.tokens, P + R, pad_id),
                       prompt_lengths=dist.gather_rows(gen.prompt_lengths),
                       response_tokens=per_token(gen.response_tokens, pad_id),
                       response_mask=per_token(gen.response_mask),
                       response_lengths=dist.gather_rows(gen.response_lengths),
                       ended=dist.gather_rows(gen.ended),
                       sample_logprobs=per_token(gen.sample_logprobs),
                       sample_values=per_token(gen.sample_values))
    return whole, {k: v if v is None else per_token(v) if v.ndim == 2 else dist.gather_rows(v)
                   for k, v in arrays.items()}


# Positions of a teacher-forced pass whose (rows, positions, vocab) float32 logits exceed
# this many bytes go through the output layer in chunks (`logit_chunk`).
LOGIT_CHUNK_BYTES = 8 << 20


def _token_head(model: nn.Module, h: mx.array, tokens: mx.array, temperature: float,
                entropy: bool):
    """log p(token) (and the entropy) at each position from trunk states, float32, logits / T.

    One exp over the (B, R, V) logits serves the log-normaliser, its gradient (exp's
    backward reuses its output) and the entropy; mx.logsumexp would take one exp forward,
    one more in its backward and a third for the entropy, and exp is the costliest op of the
    MLX CPU backend (~13 ns an element against ~0.1 for an add). The log-probs and their
    gradient are bit-equal to take(logits - logsumexp(logits)); take(logits) - lse is the
    same float op without the (B, R, V) log-softmax in memory."""
    logits = lm_logits(model, h).astype(mx.float32) / temperature
    m = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
    e = mx.exp(logits - m)
    total = e.sum(axis=-1)
    lse = m.squeeze(-1) + mx.log(total)
    lp = mx.take_along_axis(logits, tokens[..., None], axis=-1).squeeze(-1) - lse
    if not entropy:
        return lp
    sg = mx.stop_gradient
    p = sg(e) / sg(total)[..., None]
    return lp, sg(lse) - (p * sg(logits)).sum(axis=-1)     # -sum p log p = lse - sum p logits


def response_forward(model: nn.Module, tokens: mx.array, prompt_lengths: mx.array,
                     response_tokens: mx.array, temperature: float = 1.0,
                     value_head: nn.Module | None = None, return_logits: bool = False,
                     detach_values: bool = False, return_entropy: bool = False,
                     logit_chunk: int | None = None):
    """Teacher-forced pass over right-padded rows: one trunk pass gives log-probabilities of
    the response tokens (from logits / T, float32) and, with a value head, the values.

    Returns (logprobs (B, R), values (B, R) or None, logits (B, R, V) or None); with
    `return_entropy` the third item is each position's entropy (B, R) instead of logits.
    `detach_values` stops the value loss's gradient at the trunk (value head trains alone). Position j of
    the response is predicted from the hidden state at prompt_length + j - 1, which is
    also the state the value V_j is read from.

    `logit_chunk`: positions per chunk through the output layer, each chunk under
    mx.checkpoint (its logits are recomputed in the backward pass instead of kept), so the
    (B, R, V) logits never sit in memory whole; None: chunks of LOGIT_CHUNK_BYTES when the
    logits would be larger; 0: one piece. The results are the same floats either way.
    """
    R = response_tokens.shape[1]
    L = tokens.shape[1]
    h = hidden_states(model, tokens)
    pos = mx.minimum(prompt_lengths[:, None] - 1 + mx.arange(R)[None, :], L - 1)
    h = mx.take_along_axis(h, pos[:, :, None], axis=1)                    # (B, R, H)
    if value_head is None:
        values = None
    else:   # detach_values: the value loss trains the head only, not the shared trunk
        values = value_head(mx.stop_gradient(h) if detach_values else h)
    if return_logits:
        logits = lm_logits(model, h).astype(mx.float32) / temperature
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        logprobs = mx.take_along_axis(logprobs, response_tokens[:, :, None], axis=-1).squeeze(-1)
        return logprobs, values, logits
    B = tokens.shape[0]
    vocab = _vocab_size(model, h)
    if logit_chunk is None:
        per_pos = B * vocab * 4
        logit_chunk = 0 if B * R * per_pos <= LOGIT_CHUNK_BYTES else max(1, LOGIT_CHUNK_BYTES // per_pos)
    if not logit_chunk or logit_chunk >= R:
        out = _token_head(model, h, response_tokens, temperature, return_entropy)
    else:
        # the token ids are indices: no gradient (mx.checkpoint would ask for one of every input)
        head = mx.checkpoint(lambda hh, tt: _token_head(model, hh, mx.stop_gradient(tt), temperature,
                                                        return_entropy))
        parts = [head(h[:, s:s + logit_chunk], response_tokens[:, s:s + logit_chunk])
                 for s in range(0, R, logit_chunk)]
        out = ([mx.concatenate([p[i] for p in parts], axis=1) for i in range(2)] if return_entropy
               else mx.concatenate(parts, axis=1))
    if return_entropy:
        return out[0], values, out[1]
    return out, values, None


def _vocab_size(model: nn.Module, h: mx.array) -> int:
    v = getattr(getattr(model, "args", None), "vocab_size", None)
    if isinstance(v, int):
        return v
    return lm_logits(model, h[:1, :1]).shape[-1]


def batched_response_forward(model: nn.Module, gen: Generation, temperature: float,
                             value_head: nn.Module | None = None,
                             forward_batch_size: int | None = None) -> tuple[mx.array, mx.array | None]:
    """`response_forward` without gradients over a whole rollout, in chunks of rows."""
    B = gen.tokens.shape[0]
    n = forward_batch_size or B
    lps, vals = [], []
    for s in range(0, B, n):
        lp, v, _ = response_forward(model, gen.tokens[s:s + n], gen.prompt_lengths[s:s + n],
                                    gen.response_tokens[s:s + n], temperature, value_head)
        mx.eval(lp, v) if v is not None else mx.eval(lp)
        lps.append(lp)
        vals.append(v)
    lp = mx.concatenate(lps, axis=0) * gen.response_mask
    v = mx.concatenate(vals, axis=0) * gen.response_mask if value_head is not None else None
    return mx.stop_gradient(lp), (mx.stop_gradient(v) if v is not None else None)
