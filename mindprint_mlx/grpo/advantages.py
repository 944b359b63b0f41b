"""Critic-free advantages from k scored samples per prompt.

Scores are laid out group by group: rows i*k .. i*k + k - 1 are prompt i's k samples.
"""

from __future__ import annotations

import mlx.core as mx


def _groups(scores, group_size: int) -> mx.array:
    s = mx.array(scores).astype(mx.float32).reshape(-1)
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group needs a baseline), got {group_size}")
    if s.size % group_size:
        raise ValueError(f"{s.size} scores do not split into groups of {group_size}")
    return s.reshape(-1, group_size)


def group_advantages(scores, group_size: int, scale_by_std: bool = True,
                     eps: float = 1e-4) -> mx.array:
    """GRPO (Shao et al. 2024): each score minus its group's mean, divided by the group's
    unbiased standard deviation plus eps (TRL's 1e-4) when `scale_by_std`; without the
    division it is Dr. GRPO's (Liu et al. 2025) unbiased advantage. (B*k,) -> (B*k,)."""
    g = _groups(scores, group_size)
    mean = g.mean(axis=1, keepdims=True)
    adv = g - mean
    if scale_by_std:
        std = mx.sqrt(((g - mean) ** 2).sum(axis=1, keepdims=True) / (group_size - 1))
        adv = adv / (std + eps)
    return adv.reshape(-1)


def rloo_advantages(scores, group_size: int) -> mx.array:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): each score minus
    the mean of the *other* k - 1 scores of its group, (sum - r_i) / (k - 1). (B*k,) -> (B*k,)."""
    g = _groups(scores, group_size)
    baseline = (g.sum(axis=1, keepdims=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1)


def group_std_is_zero(scores, group_size: int) -> mx.array:
    """(B,) bool: groups whose k scores are all equal (they carry no GRPO signal)."""
    g = _groups(scores, group_size)
    return (g.max(axis=1) - g.min(axis=1)) == 0
