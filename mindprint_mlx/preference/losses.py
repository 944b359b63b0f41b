"""The DPO family's losses as pure functions of sequence log-probabilities.

Conventions (those of TRL's `DPOTrainer.dpo_loss`, re-derived here):
    h = (log pi(y_w|x) - log pi(y_l|x)) - (log ref(y_w|x) - log ref(y_l|x))
the policy's chosen-over-rejected log-ratio minus the reference's.
    sigmoid (DPO, Rafailov et al. 2023), with label smoothing eps (conservative DPO,
    Mitchell 2023: the label is wrong with probability eps):
        loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
    ipo (Azar et al. 2023, eq. 17): a squared loss that pulls h to 1 / (2 beta):
        loss = (h - 1 / (2 beta))^2
    (IPO is defined on per-token *mean* log-probabilities; the trainer passes those.)
The implicit rewards are beta times each answer's policy-over-reference log-ratio,
detached: r_w = beta * (log pi(y_w) - log ref(y_w)), r_l likewise.
    RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"; TRL's `rpo_alpha`)
    adds alpha times the chosen answer's negative log-likelihood per token to each pair's
    loss: DPO alone can lower the chosen answer's likelihood along with the rejected one's
    (it only widens the gap), and the NLL term keeps the preferred answers likely.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

DPO_LOSS_TYPES = ("sigmoid", "ipo")


def dpo_loss(policy_chosen_logps: mx.array, policy_rejected_logps: mx.array,
             ref_chosen_logps: mx.array, ref_rejected_logps: mx.array, beta: float,
             loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[mx.array, mx.array, mx.array]:
    """Per-pair losses (B,), chosen rewards (B,) and rejected rewards (B,), see the module
    docstring. All inputs are (B,) sequence log-probabilities; beta > 0; label_smoothing
    in [0, 0.5) and only for `sigmoid`. Rewards carry no gradient."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {', '.join(DPO_LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("label_smoothing applies to the sigmoid loss only, not to ipo")
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * nn.log_sigmoid(beta * h) \
            - label_smoothing * nn.log_sigmoid(-beta * h)
    else:
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    chosen_rewards = mx.stop_gradient(beta * (policy_chosen_logps - ref_chosen_logps))
    rejected_rewards = mx.stop_gradient(beta * (policy_rejected_logps - ref_rejected_logps))
    return losses, chosen_rewards, rejected_rewards


def sequence_logps(token_logprobs: mx.array, mask: mx.array, average: bool = False) -> mx.array:
    """Sum (or, with `average`, the mean) of each row's masked token log-probabilities."""
    total = (mx.where(mask > 0, token_logprobs, 0.0) * mask).sum(axis=-1)
    return total / mx.maximum(mask.sum(axis=-1), 1.0) if average else total


def rpo_nll(chosen_token_logprobs: mx.array, chosen_mask: mx.array) -> mx.array:
    """RPO's term, per pair (B,): the chosen answer's negative log-likelihood per token
    (its length-normalised NLL, as in Pang et al. 2024)."""
    return -sequence_logps(chosen_token_logprobs, chosen_mask, average=True)
