"""Per-topic training settings from the topic's data quality, each with its reason in words.

Rules (bounds in `AdaptiveBounds`, loadable from YAML with `load_bounds`):

- SFT epochs: `max_epochs` for `epochs_few_examples` SFT examples or fewer, `min_epochs` for
  `epochs_many_examples` or more, linear (rounded) in between: small topics see their data
  more often. Never increases with the example count.
- batch size: `min_batch_size` at `batch_few_examples` or fewer, `max_batch_size` at
  `batch_many_examples` or more, linear (rounded) in between, and never more than the number
  of examples. Never decreases with the example count.
- learning-rate multiplier: `min_lr_multiplier + quality_score * (max - min)`: noisy,
  ambiguous data trains more gently. Never decreases with quality.
- pass threshold (quiz score needed to skip PPO): `min_pass_threshold` at
  `density_low` % voice-marker coverage or less, `max_pass_threshold` at `density_high` % or
  more, linear in between: data rich in the voice sets a higher bar. Without voice markers,
  the lowest threshold. Never decreases with coverage.
- trainable: at least `min_sft_examples` SFT examples and `min_quiz_questions` quiz questions;
  otherwise the topic is skipped with the reason.

`decide` is a pure function of its inputs: same quality and bounds, same plan.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from ..config import ConfigError, load_config
from .quality import TopicQuality


@dataclass
class AdaptiveBounds:
    min_epochs: int = field(
        default=3, metadata={"help": "SFT epochs of a topic with many examples"})
    max_epochs: int = field(default=5, metadata={"help": "SFT epochs of a topic with few examples"})
    epochs_few_examples: int = field(default=8, metadata={"help": "at or below: max_epochs"})
    epochs_many_examples: int = field(default=64, metadata={"help": "at or above: min_epochs"})
    min_batch_size: int = field(default=2, metadata={"help": "SFT batch size of a small topic"})
    max_batch_size: int = field(default=8, metadata={"help": "SFT batch size of a large topic"})
    batch_few_examples: int = field(default=8, metadata={"help": "at or below: min_batch_size"})
    batch_many_examples: int = field(default=64, metadata={"help": "at or above: max_batch_size"})
    min_lr_multiplier: float = field(
        default=0.5, metadata={"help": "learning-rate multiplier at data quality 0"})
    max_lr_multiplier: float = field(
        default=1.0, metadata={"help": "learning-rate multiplier at data quality 1"})
    min_pass_threshold: float = field(
        default=0.75,
        metadata={"help": "quiz score to pass (and skip PPO) for data poor in voice markers"})
    max_pass_threshold: float = field(
        default=0.85,
        metadata={"help": "quiz score to pass (and skip PPO) for data rich in voice markers"})
    density_low: float = field(
        default=20.0, metadata={"help": "marker coverage (%) at or below: min_pass_threshold"})
    density_high: float = field(
        default=80.0, metadata={"help": "marker coverage (%) at or above: max_pass_threshold"})
    min_sft_examples: int = field(
        default=2, metadata={"help": "fewer SFT examples: the topic is skipped, with the reason"})
    min_quiz_questions: int = field(
        default=1,
        metadata={"help": "fewer quiz questions: the topic is skipped (it cannot be graded)"})

    def validate(self) -> None:
        pairs = [("min_epochs", "max_epochs"), ("min_batch_size", "max_batch_size"),
                 ("min_lr_multiplier", "max_lr_multiplier"),
                 ("min_pass_threshold", "max_pass_threshold"), ("density_low", "density_high")]
        for lo, hi in pairs:
            if getattr(self, lo) > getattr(self, hi):
                raise ConfigError(f"{lo} ({getattr(self, lo)}) must not exceed {hi} "
                                  f"({getattr(self, hi)})")
        for lo, hi in (("epochs_few_examples", "epochs_many_examples"),
                       ("batch_few_examples", "batch_many_examples")):
            if getattr(self, lo) >= getattr(self, hi):
                raise ConfigError(f"{lo} ({getattr(self, lo)}) must be below {hi} "
                                  f"({getattr(self, hi)})")
        for k in ("min_epochs", "min_batch_size", "min_sft_examples"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be at least 1, got {getattr(self, k)}")
        if self.min_quiz_questions < 0:
            raise ConfigError(f"min_quiz_questions must be >= 0, got {self.min_quiz_questions}")
        if not 0 < self.min_lr_multiplier:
            raise ConfigError(f"min_lr_multiplier must be > 0, got {self.min_lr_multiplier}")
        if not (0 <= self.min_pass_threshold and self.max_pass_threshold <= 1):
            raise ConfigError("pass thresholds must lie in [0, 1]")


def load_bounds(path: str | os.PathLike | None = None, overrides=None) -> AdaptiveBounds:
    """AdaptiveBounds from YAML (unknown keys are errors), defaults when path is None."""
    b = load_config(path, AdaptiveBounds, overrides)
    return b


@dataclass
class TopicPlan:
    sft_epochs: int
    batch_size: int
    lr_multiplier: float
    pass_threshold: float
    trainable: bool
    reasons: list[str] = field(default_factory=list)
    topic: str = ""
    skip_reason: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _frac(x: float, lo: float, hi: float) -> float:
    if x <= lo:
        return 0.0
    if x >= hi:
        return 1.0
    return (x - lo) / (hi - lo)


def _round(x: float) -> int:
    return int(x + 0.5)  # half up, deterministic (no banker's rounding)


def _n(k: int, what: str) -> str:
    return f"{k} {what}" if k == 1 else f"{k} {what}s"


def decide(quality: TopicQuality, bounds: AdaptiveBounds | None = None) -> TopicPlan:
    b = bounds or AdaptiveBounds()
    n = quality.n_sft
    reasons: list[str] = []

    f = _frac(n, b.epochs_few_examples, b.epochs_many_examples)
    epochs = _round(b.max_epochs - f * (b.max_epochs - b.min_epochs))
    reasons.append(f"sft_epochs={epochs}: {_n(n, 'SFT example')} ({b.max_epochs} epochs at "
                   f"<= {b.epochs_few_examples} examples, {b.min_epochs} at >= "
                   f"{b.epochs_many_examples}; fewer examples are seen more often)")

    f = _frac(n, b.batch_few_examples, b.batch_many_examples)
    bs = _round(b.min_batch_size + f * (b.max_batch_size - b.min_batch_size))
    capped = max(1, min(bs, n))
    why = (f"batch_size={capped}: {_n(n, 'SFT example')} ({b.min_batch_size} at <= "
           f"{b.batch_few_examples}, {b.max_batch_size} at >= {b.batch_many_examples})")
    if capped < bs:
        why += ", capped at the number of examples"
    reasons.append(why)

    q = min(1.0, max(0.0, quality.quality_score))
    lr = round(b.min_lr_multiplier + q * (b.max_lr_multiplier - b.min_lr_multiplier), 4)
    parts = []
    if quality.preference_score is not None:
        parts.append(f"preference score {quality.preference_score:.2f}")
    if quality.marker_coverage is not None:
        parts.append(f"voice-marker coverage {quality.marker_coverage:.0f}%")
    basis = " and ".join(parts) if parts else "no quality signal, neutral 0.5"
    reasons.append(f"lr_multiplier={lr:.3g}: data quality {q:.2f} ({basis}); "
                   f"{b.min_lr_multiplier:g} at quality 0, {b.max_lr_multiplier:g} at 1 "
                   f"(less clear data trains more gently)")

    if quality.marker_coverage is None:
        pt = b.min_pass_threshold
        reasons.append(f"pass_threshold={pt:.3g}: voice-marker density unknown (no voice "
                       f"markers or no completions), lowest threshold")
    else:
        f = _frac(quality.marker_coverage, b.density_low, b.density_high)
        pt = round(b.min_pass_threshold + f * (b.max_pass_threshold - b.min_pass_threshold), 4)
        reasons.append(f"pass_threshold={pt:.3g}: {quality.marker_coverage:.0f}% of completions "
                       f"use a voice marker ({b.min_pass_threshold:g} at <= {b.density_low:g}%, "
                       f"{b.max_pass_threshold:g} at >= {b.density_high:g}%; data rich in the "
                       f"voice sets a higher bar)")

    skip = []
    if n < b.min_sft_examples:
        skip.append(f"{n} SFT example{'s' if n != 1 else ''} (need at least {b.min_sft_examples})")
    if quality.n_quiz < b.min_quiz_questions:
        skip.append(f"{_n(quality.n_quiz, 'quiz question')} (need at least {b.min_quiz_questions} "
                    f"to evaluate the topic)")
    trainable = not skip
    skip_reason = None
    if trainable:
        reasons.append(f"trainable: {_n(n, 'SFT example')} and {_n(quality.n_quiz, 'quiz question')} meet the "
                       f"minimums ({b.min_sft_examples} and {b.min_quiz_questions})")
    else:
        skip_reason = "skipped: " + "; ".join(skip)
        reasons.append(f"not trainable, {skip_reason}")
    return TopicPlan(epochs, capped, lr, pt, trainable, reasons, quality.key, skip_reason)
