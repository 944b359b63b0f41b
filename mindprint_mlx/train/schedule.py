"""Learning-rate schedules as functions of the optimizer step (usable inside mx.compile)."""

from __future__ import annotations

import math
from typing import Callable

import mlx.core as mx


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    return max(0, min(total_steps - 1, int(math.ceil(warmup_ratio * total_steps))))


def cosine_with_warmup(peak_lr: float, total_steps: int, warmup_steps: int = 0,
                       min_lr: float = 0.0) -> Callable[[mx.array], mx.array]:
    """Linear warmup to `peak_lr` over `warmup_steps`, then cosine decay to `min_lr` at
    `total_steps`. Step s (0-based, the optimizer's count before its update) gets
    peak * (s + 1) / (warmup + 1) while warming up, so the first update is never 0."""
    total = max(1, int(total_steps))
    warm = max(0, min(int(warmup_steps), total - 1))
    decay = max(1, total - warm)

    def schedule(step):
        s = mx.array(step).astype(mx.float32)
        warm_lr = peak_lr * (s + 1.0) / (warm + 1.0)
        t = mx.clip((s - warm) / decay, 0.0, 1.0)
        cos_lr = min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + mx.cos(math.pi * t))
        return mx.where(s < warm, warm_lr, cos_lr)

    return schedule
