"""KL estimators and the KL-coefficient controllers of classic RLHF PPO (Ziegler et al. 2019)."""

from __future__ import annotations

import mlx.core as mx

KL_ESTIMATORS = ("k1", "abs", "mse", "k3")


def kl_estimate(logprobs: mx.array, ref_logprobs: mx.array, estimator: str = "k1") -> mx.array:
    """Per-token KL(policy || reference) estimate from sampled tokens' log-probabilities.

    k1 = logp - ref_logp (unbiased, may be negative per token); abs = |k1|;
    mse = 0.5 * k1^2; k3 = (exp(-k1) - 1) + k1 (non-negative and unbiased, Schulman's k3).
    """
    k1 = logprobs - ref_logprobs
    if estimator == "k1":
        return k1
    if estimator == "abs":
        return mx.abs(k1)
    if estimator == "mse":
        return 0.5 * k1 * k1
    if estimator == "k3":
        return (mx.exp(-k1) - 1) + k1
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")


class AdaptiveKLController:
    """beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon (Ziegler et al. 2019)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class FixedKLController:
    """A constant beta."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
