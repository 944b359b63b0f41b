"""The PPO objective: clipped surrogate plus clipped value loss, with the stats practitioners read."""

from __future__ import annotations

import mlx.core as mx

from .advantages import masked_mean, masked_var


def entropy_from_logits(logits: mx.array) -> mx.array:
    """Per-position entropy (nats) of softmax(logits), computed in float32."""
    logits = logits.astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return -(mx.exp(logp) * logp).sum(axis=-1)


def ppo_losses(logprobs: mx.array, old_logprobs: mx.array, values: mx.array, old_values: mx.array,
               advantages: mx.array, returns: mx.array, mask: mx.array, cliprange: float = 0.2,
               cliprange_value: float = 0.2, vf_coef: float = 0.1,
               logits: mx.array | None = None,
               entropy: mx.array | None = None) -> tuple[mx.array, dict[str, mx.array]]:
    """loss = clipped surrogate + vf_coef * clipped value loss, means over the masked tokens.

    Returns (loss, stats); stats are detached scalars: loss/policy, loss/value, loss/total,
    policy/{clipfrac, approxkl, policykl, ratio_mean, ratio_var, advantages_mean, entropy},
    val/{clipfrac, vpred, error, mean, var, explained_variance}, returns/{mean, var}, and
    policy/entropy from `logits` (B, R, V) or from per-position `entropy` (B, R).
    """
    # Value loss: the worse of the unclipped and the clipped (to old value +- c) prediction.
    vpred_clipped = mx.clip(values, old_values - cliprange_value, old_values + cliprange_value)
    vf_losses1 = (values - returns) ** 2
    vf_losses2 = (vpred_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(mx.maximum(vf_losses1, vf_losses2), mask)
    vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).astype(mx.float32), mask)

    # Policy loss: clipped surrogate on the probability ratio, PPO's epsilon = cliprange.
    log_ratio = logprobs - old_logprobs
    ratio = mx.exp(log_ratio)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * mx.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(mx.maximum(pg_losses1, pg_losses2), mask)
    pg_clipfrac = masked_mean((pg_losses2 > pg_losses1).astype(mx.float32), mask)

    loss = pg_loss + vf_coef * vf_loss

    sg = mx.stop_gradient
    ratio_d, values_d, returns_d = sg(ratio), sg(values), sg(returns)
    return_var = masked_var(returns_d, mask)
    stats = {
        "loss/policy": sg(pg_loss),
        "loss/value": sg(vf_loss),
        "loss/total": sg(loss),
        "policy/clipfrac": pg_clipfrac,
        "policy/approxkl": sg(0.5 * masked_mean(log_ratio * log_ratio, mask)),
        "policy/policykl": sg(masked_mean(-log_ratio, mask)),
        "policy/ratio_mean": masked_mean(ratio_d, mask),
        "policy/ratio_var": masked_var(ratio_d, mask),
        "policy/advantages_mean": masked_mean(advantages, mask),
        "val/clipfrac": vf_clipfrac,
        "val/vpred": masked_mean(values_d, mask),
        "val/error": masked_mean(sg(vf_losses1), mask),
        # the rollout's values, as TRL (0.11) logs them; the new predictions are val/vpred
        "val/mean": masked_mean(old_values, mask),
        "val/var": masked_var(old_values, mask),
        # 1 - Var(R - V) / Var(R): 1 is a perfect critic, 0 no better than a constant.
        "val/explained_variance": 1.0 - masked_var(returns_d - values_d, mask) / (return_var + 1e-8),
        "returns/mean": masked_mean(returns_d, mask),
        "returns/var": return_var,
    }
    if entropy is None and logits is not None:
        entropy = entropy_from_logits(sg(logits))
    if entropy is not None:
        stats["policy/entropy"] = masked_mean(sg(entropy), mask)
    return loss, stats
