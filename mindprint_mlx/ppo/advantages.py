"""Rewards, advantages and masked statistics of classic RLHF PPO (batch-first, `mask` = response tokens).

Each detail of the classic formulation ("The N implementation details of RLHF with PPO";
TRL's PPOTrainer up to v0.11) is one visible line below.
"""

from __future__ import annotations

import mlx.core as mx

from ..models.heads import last_token_index
from .kl import kl_estimate


def masked_mean(x: mx.array, mask: mx.array, axis: int | None = None) -> mx.array:
    """Mean of x over the entries where mask is 1 (over `axis`, or all)."""
    x = mx.where(mask > 0, x, 0.0)   # an inf or nan outside the mask must not leak in
    if axis is not None:
        return (x * mask).sum(axis=axis) / mask.sum(axis=axis)
    return (x * mask).sum() / mask.sum()


def masked_var(x: mx.array, mask: mx.array, unbiased: bool = True) -> mx.array:
    """Variance over masked entries; unbiased (Bessel) unless a single entry is masked."""
    mean = masked_mean(x, mask)
    centered = x - mean
    var = masked_mean(centered * centered, mask)
    if unbiased:
        n = mask.sum()
        var = var * mx.where(n > 1, n / mx.maximum(n - 1, 1), 1.0)
    return var


def masked_whiten(x: mx.array, mask: mx.array, shift_mean: bool = True) -> mx.array:
    """(x - mean) / sqrt(var + 1e-8) over masked entries; the mean is added back if not
    shift_mean. (Data parallel PPO whitens the whole batch: every rank holds it.)"""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * mx.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def kl_penalized_rewards(scores: mx.array, logprobs: mx.array, ref_logprobs: mx.array,
                         mask: mx.array, kl_coef, kl_estimator: str = "k1") -> tuple[mx.array, mx.array]:
    """Per-token rewards (B, T) and per-token KL (B, T).

    reward_t = -kl_coef * kl_t on every response token, plus the sequence score on the
    last response token of each row (the EOS, or the last token of a truncated response).
    """
    kl = kl_estimate(logprobs, ref_logprobs, kl_estimator) * mask
    rewards = -kl_coef * kl
    T = mask.shape[1]
    # The score lands on the last real response token (TRL's later trainer put it one past EOS: a bug).
    last = (mx.arange(T)[None, :] == last_token_index(mask)[:, None]) & (mask.sum(axis=1) > 0)[:, None]
    rewards = rewards + mx.where(last, scores[:, None].astype(rewards.dtype), 0.0)
    return rewards * mask, kl


def gae(rewards: mx.array, values: mx.array, mask: mx.array, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[mx.array, mx.array]:
    """Generalised advantage estimation by a reverse scan over the masked tokens of each row.

    Values and rewards are masked to 0 first; the value after the last response token is 0;
    unmasked positions get advantage 0 and are skipped (the next masked token's value and
    advantage carry across them). returns = advantages + values, before any whitening.
    """
    rewards = rewards * mask
    values = values * mask
    B, T = rewards.shape
    next_value = mx.zeros((B,), dtype=values.dtype)   # V after the last token = 0
    last_gae = mx.zeros((B,), dtype=values.dtype)
    columns = [None] * T
    for t in reversed(range(T)):
        m = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * last_gae
        columns[t] = mx.where(m, a, 0.0)
        last_gae = mx.where(m, a, last_gae)
        next_value = mx.where(m, values[:, t], next_value)
    advantages = mx.stack(columns, axis=1)
    returns = advantages + values
    return advantages, returns
