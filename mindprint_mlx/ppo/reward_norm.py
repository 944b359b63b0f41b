"""Reward normalisation as in OpenAI's lm-human-preferences (Ziegler et al. 2019): before
PPO starts, sample the frozen SFT policy (the reference) on the training prompts, score the
samples with the reward function, and fix a gain and bias so that those scores have mean 0
and std 1. Every score PPO sees is then `gain * score + bias`. Unlike `score_norm`'s running
statistics, the map is fixed for the whole run, so a rising normalised score is a rising raw
score; it is saved with the checkpoint, so a resumed run keeps the same map.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Sequence

import mlx.core as mx
import numpy as np

from ..errors import MindprintError
from ..models import lora
from ..models.heads import ScalarHead
from .rollout import generate_batch

if TYPE_CHECKING:
    from .trainer import PPOTrainer

log = logging.getLogger(__name__)

MIN_STD = 1e-6      # below this the samples' scores are "all the same": gain 1, bias -mean


@dataclass
class RewardNorm:
    """score -> gain * score + bias; `mean` and `std` are the samples' raw statistics."""

    gain: float = 1.0
    bias: float = 0.0
    mean: float = 0.0
    std: float = 1.0
    samples: int = 0

    def apply(self, scores: mx.array) -> mx.array:
        return scores * self.gain + self.bias

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RewardNorm":
        return cls(**{k: (int(v) if k == "samples" else float(v)) for k, v in d.items()
                      if k in cls.__dataclass_fields__})


def fit_reward_norm(scores: Sequence[float], target_mean: float = 0.0,
                    target_std: float = 1.0) -> RewardNorm:
    """gain = target_std / std, bias = target_mean - gain * mean (population std, as
    lm-human-preferences' `tf.nn.moments`). A spread below MIN_STD (one sample, or every
    sample scored alike) cannot be scaled: gain 1, and only the mean is moved."""
    x = np.asarray(scores, dtype=np.float64).reshape(-1)
    if x.size == 0 or not np.isfinite(x).all():
        raise MindprintError(f"reward normalisation: {x.size} scores, not all finite")
    mean, std = float(x.mean()), float(x.std())
    if std < MIN_STD:
        log.warning("reward normalisation: the %d sample scores have std %.3g; gain 1 (only the "
                    "mean is moved)", x.size, std)
        gain = 1.0
    else:
        gain = target_std / std
    return RewardNorm(gain=gain, bias=target_mean - gain * mean, mean=mean, std=std,
                      samples=int(x.size))


def norm_prompt_indices(n_prompts: int, n_samples: int, seed: int) -> list[int]:
    """Which prompt each normalisation sample uses: seeded permutations, cycled."""
    out: list[int] = []
    epoch = 0
    while len(out) < n_samples:
        out.extend(int(i) for i in np.random.default_rng([seed, epoch, 71]).permutation(n_prompts))
        epoch += 1
    return out[:n_samples]


def sample_reward_norm(trainer: "PPOTrainer", prompts: Sequence[Sequence[int]],
                       n_samples: int) -> RewardNorm:
    """Sample `n_samples` responses of the reference policy (the frozen adapters, i.e. the
    SFT policy) on `prompts` with the rollout settings, score them with the trainer's
    reward function and fit the map. Deterministic in (cfg.seed, prompts, the model);
    every rank computes the same samples, so all ranks get the same map."""
    cfg, model = trainer.cfg, trainer.model
    idx = norm_prompt_indices(len(prompts), n_samples, cfg.seed)
    bs = max(cfg.batch_size, 1)
    scores: list[float] = []
    for b, s in enumerate(range(0, len(idx), bs)):
        rows = [prompts[i] for i in idx[s:s + bs]]
        key = mx.random.key(int(np.random.default_rng([cfg.seed, b, 73]).integers(2 ** 31)))
        with lora.active_adapters(model, trainer.reference_adapters):
            gen = generate_batch(model, rows, cfg.max_new_tokens, trainer.eos_ids, trainer.pad_id,
                                 cfg.temperature, cfg.top_p, key)
        with lora.active_adapters(model, []):   # the reward fn switches in its own adapter
            got = mx.array(trainer.reward_fn(gen.tokens, gen.lengths)).astype(mx.float32).reshape(-1)
        if got.shape[0] != len(rows):
            raise MindprintError(f"reward_fn returned {got.shape[0]} scores for {len(rows)} responses")
        scores.extend(float(v) for v in got.tolist())
    norm = fit_reward_norm(scores)
    log.info("reward normalisation on %d SFT-policy samples: mean %.4g std %.4g -> gain %.4g "
             "bias %.4g", norm.samples, norm.mean, norm.std, norm.gain, norm.bias)
    return norm


def value_head_from_reward(reward_head: ScalarHead, hidden: int,
                           norm: RewardNorm | None = None) -> ScalarHead:
    """A value head that starts as the reward head (Ziegler et al. initialise the value
    function from the reward model), with the normalisation folded in so that it predicts
    normalised scores: w' = gain * w, b' = gain * b + bias."""
    w = reward_head.summary.weight
    if w.shape[-1] != hidden:
        raise MindprintError(f"value_head_init=reward: the reward head is {w.shape[-1]} wide, "
                             f"the policy's hidden size is {hidden}")
    gain, bias = (norm.gain, norm.bias) if norm is not None else (1.0, 0.0)
    head = ScalarHead(hidden)
    head.summary.weight = (w.astype(mx.float32) * gain)
    # a RewardModel's head has no bias (Bradley-Terry cannot train one): bias_value is 0
    head.summary.bias = mx.array([reward_head.bias_value * gain + bias], dtype=mx.float32)
    mx.eval(head.parameters())
    return head


def check_declared_adapters(model, frozen_adapters: Sequence[str]) -> None:
    """Every adapter active in the model must be declared frozen: the reference policy is
    exactly the frozen adapters, so an active but undeclared one would be in the policy's
    rollouts before PPO starts but silently missing from the reference."""
    declared = set(frozen_adapters)
    active = sorted({n for names in lora.get_active(model).values() for n in names} - declared)
    if active:
        raise MindprintError(
            f"PPO: adapter '{active[0]}' is active in the model but not in frozen_adapters "
            f"({', '.join(frozen_adapters) or 'none'}); pass it in frozen_adapters to keep it in "
            "the reference, or deactivate it (lora.set_active)")

