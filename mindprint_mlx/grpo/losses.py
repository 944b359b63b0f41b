"""GRPO's per-token objective: PPO's clipped ratio surrogate on a per-sequence advantage,
plus beta times Schulman's k3 estimate of KL(policy || reference), averaged three ways.

Per response token t (ratio rho_t = pi(y_t) / pi_old(y_t), advantage A of its sequence):
    loss_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta * k3_t
    k3_t   = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (>= 0, unbiased)
Reductions (TRL's `loss_type`):
    grpo    : the mean over each sequence's tokens, then over sequences (GRPO paper)
    dapo    : one mean over every token of the batch (DAPO; TRL's bnpo on one process)
    dr_grpo : the token sum over (sequences * max_completion_length) (Dr. GRPO), a constant
              that does not depend on how long the responses are
"""

from __future__ import annotations

import mlx.core as mx

from ..ppo.advantages import masked_mean

GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def k3_kl(logprobs: mx.array, ref_logprobs: mx.array) -> mx.array:
    """Per-token k3 = exp(ref - logp) - (ref - logp) - 1."""
    d = ref_logprobs - logprobs
    return mx.exp(d) - d - 1.0


def loss_denominator(mask: mx.array, loss_type: str, max_completion_length: int | None = None) -> float:
    """What `grpo_loss` divides its summed contributions by, for the whole batch `mask`
    (B, R): B (grpo), the token count (dapo), B * max_completion_length (dr_grpo). Pass
    it as `total` when a batch is split into micro-batches (or ranks) whose gradients are
    summed: the sum is then exactly the full batch's loss."""
    B, R = mask.shape
    if loss_type == "grpo":
        return float(B)
    if loss_type == "dapo":
        return max(float(mask.sum().item()), 1.0)
    if loss_type == "dr_grpo":
        return float(B * (max_completion_length or R))
    raise ValueError(f"unknown GRPO loss_type {loss_type!r}; choose one of {', '.join(GRPO_LOSS_TYPES)}")


def grpo_loss(logprobs: mx.array, old_logprobs: mx.array, ref_logprobs: mx.array | None,
              advantages: mx.array, mask: mx.array, beta: float = 0.04, epsilon: float = 0.2,
              epsilon_high: float | None = None, loss_type: str = "grpo",
              max_completion_length: int | None = None,
              total: float | None = None) -> tuple[mx.array, dict[str, mx.array]]:
    """The module docstring's loss over response tokens `mask` (B, R); `advantages` is (B,).

    `ref_logprobs` may be None when beta == 0. `total` replaces the batch's own
    denominator (see `loss_denominator`). Returns (loss, stats): detached scalars
    loss/policy, loss/kl (token mean of k3), policy/clipfrac (tokens clipped), ratio_mean.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; choose one of {', '.join(GRPO_LOSS_TYPES)}")
    if beta and ref_logprobs is None:
        raise ValueError("grpo_loss: beta > 0 needs ref_logprobs")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    adv = advantages.astype(mx.float32)[:, None]
    ratio = mx.exp(logprobs - old_logprobs)
    clipped = mx.clip(ratio, 1.0 - epsilon, 1.0 + eps_high)
    pg = -mx.minimum(ratio * adv, clipped * adv)
    kl = k3_kl(logprobs, ref_logprobs) if ref_logprobs is not None else mx.zeros_like(pg)
    per_token = pg + beta * kl if beta else pg
    per_token = mx.where(mask > 0, per_token, 0.0) * mask
    if total is None:
        total = loss_denominator(mask, loss_type, max_completion_length)
    if loss_type == "grpo":
        num = (per_token.sum(axis=-1) / mx.maximum(mask.sum(axis=-1), 1.0)).sum()
    else:
        num = per_token.sum()
    loss = num / total
    sg = mx.stop_gradient
    stats = {
        "loss/total": sg(loss),
        "loss/policy": sg(masked_mean(pg, mask)),
        "loss/kl": sg(masked_mean(kl, mask)),
        "policy/clipfrac": masked_mean((clipped * adv < ratio * adv).astype(mx.float32), mask),
        "policy/ratio_mean": sg(masked_mean(ratio, mask)),
    }
    return loss, stats
