"""`PipelineConfig`: everything a curriculum run needs, loaded from YAML with checked keys.

The trainers' own settings (`sft`, `ppo`, `reward.train`, `adaptive`) are kept here as
plain mappings and turned into the trainers' dataclasses (`SFTConfig`, `PPOConfig`,
`RewardConfig`, the adaptive bounds) by `resolve_sections`, so a mistyped key there is
an error naming `sft.<key>` and the file, exactly like a key of this file.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..config import ConfigError, from_dict, to_dict
from ..evaluate import QuizWeights


@dataclass
class RewardSettings:
    """The reward model: trained once per run (into run_dir/reward_model) or reused."""

    path: Optional[str] = None      # an existing reward model directory to reuse (no training)
    train: dict[str, Any] = field(default_factory=dict)   # RewardConfig keys (train.reward)
    continue_at_chance: bool = False  # go on to PPO with a reward model at chance validation accuracy


@dataclass
class EvalSettings:
    """The quiz evaluation of each topic (see mindprint_mlx.evaluate)."""

    max_tokens: int = 64            # answer length per quiz question (greedy)
    max_questions: int = 16         # quiz questions used per topic (the first N)
    weights: QuizWeights = field(default_factory=QuizWeights)
    reward_samples: int = 2         # sampled answers per prompt for the before/after-PPO mean reward
    judge: str = "split"            # quiz preference part: split (own reward model on the other half of the pairs) | reward | a reward-model dir
    retention: bool = True          # re-quiz every earlier topic after each topic (the retention matrix)

    def validate(self) -> None:
        if self.max_tokens < 1 or self.max_questions < 1 or self.reward_samples < 1:
            raise ConfigError("eval.max_tokens, eval.max_questions and eval.reward_samples must be >= 1")
        if not self.judge:
            raise ConfigError("key 'eval.judge': split, reward or a reward-model directory")
        if self.judge not in ("split", "reward") and not Path(self.judge).is_dir():
            raise ConfigError(f"key 'eval.judge': {self.judge!r} is neither split, reward nor a "
                              "reward-model directory")
        self.weights.validate()


@dataclass
class VerifySettings:
    """After a unit's adapters are merged: re-evaluate the unit's topics."""

    tolerance: float = 0.05         # a quiz score drop larger than this is a regression
    stop_on_regression: bool = False  # stop the run on a regression (else report it and go on)


@dataclass
class EstimateSettings:
    """Assumptions of the dry run's time estimate (no effect on training)."""

    tflops: float = 0.0             # sustained training TFLOP/s; 0: 8 on Apple silicon, 0.05 elsewhere
    ppo_gen_tokens: int = 64        # tokens generated per PPO rollout (when ppo has no such key)


@dataclass
class PipelineConfig:
    """A curriculum run: reward model once; per topic SFT -> quiz -> PPO if below the
    threshold -> final quiz; after each unit merge, verify, continue on merged weights."""

    model: str = ""                 # base model: local Hugging Face directory or hub id
    data_dir: str = ""              # curriculum data directory (JSONL files, persona)
    run_dir: str = "runs/mindprint" # everything the run writes (layout: docs/design.md, run directory)
    quantize: Optional[int] = None  # quantize the base on load: 4 or 8 (QLoRA); null keeps it
    seed: int = 0
    units: list[str] = field(default_factory=list)    # only these units (empty: all)
    topics: list[str] = field(default_factory=list)   # only these topics (empty: all)
    reward: RewardSettings = field(default_factory=RewardSettings)
    sft: dict[str, Any] = field(default_factory=dict)       # SFTConfig defaults (train.sft)
    ppo: dict[str, Any] = field(default_factory=dict)       # PPOConfig defaults (ppo)
    adaptive: dict[str, Any] = field(default_factory=dict)  # adaptive bounds (data.adaptive)
    run_ppo: bool = True            # false: never run PPO (SFT + quiz only)
    eval: EvalSettings = field(default_factory=EvalSettings)
    verify: VerifySettings = field(default_factory=VerifySettings)
    estimate: EstimateSettings = field(default_factory=EstimateSettings)

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("key 'model' is required (a model directory or hub id)")
        if not self.data_dir:
            raise ConfigError("key 'data_dir' is required (the curriculum data directory)")
        if self.quantize not in (None, 4, 8):
            raise ConfigError(f"key 'quantize': must be 4, 8 or null, got {self.quantize!r}")
        if not 0 <= self.verify.tolerance <= 1:
            raise ConfigError(f"key 'verify.tolerance': must be in [0, 1], got {self.verify.tolerance}")
        self.eval.validate()


# Where each free-form section's dataclass lives (module, candidate class names).
SECTIONS = {
    "sft": ("mindprint_mlx.train.sft", ("SFTConfig",)),
    "ppo": ("mindprint_mlx.ppo", ("PPOConfig",)),
    "reward.train": ("mindprint_mlx.train.reward", ("RewardConfig",)),
    "adaptive": ("mindprint_mlx.data.adaptive", ("AdaptiveBounds", "Bounds", "AdaptiveConfig")),
}


def section_class(section: str) -> type | None:
    """The dataclass for a section, or None while its module is not installed."""
    mod_name, names = SECTIONS[section]
    try:
        mod = importlib.import_module(mod_name)
    except ImportError:
        return None
    for n in names:
        cls = getattr(mod, n, None)
        if cls is not None and dataclasses.is_dataclass(cls):
            return cls
    return None


# Where the pipeline's default differs from the trainer's own (the section's keys win):
# PPO's scores are normalised (gain and bias fitted on SFT-policy samples at the start of the
# phase), since value clipping and the KL coefficient assume scores of order 1 and a reward
# model's raw scale is arbitrary; the standalone trainer keeps the classic default (off).
PIPELINE_DEFAULTS: dict[str, dict[str, Any]] = {"ppo": {"reward_norm": "sft_samples"}}


def section_values(cfg: PipelineConfig, section: str) -> dict:
    vals = cfg.reward.train if section == "reward.train" else getattr(cfg, section)
    return {**PIPELINE_DEFAULTS.get(section, {}), **vals}


def resolve_section(cfg: PipelineConfig, section: str, source: str = "<config>",
                    strict: bool = True) -> Any:
    """The section as its trainer's dataclass (unknown keys are errors naming the key)."""
    cls = section_class(section)
    if cls is None:
        if strict:
            raise ConfigError(f"{source}: section '{section}' needs {SECTIONS[section][0]}, "
                              "which is not available in this installation")
        return dict(section_values(cfg, section))
    return from_dict(cls, section_values(cfg, section), source, prefix=section)


def check_sections(cfg: PipelineConfig, source: str) -> None:
    """Validate every section whose trainer is installed."""
    for s in SECTIONS:
        resolve_section(cfg, s, source, strict=False)


def load_pipeline_config(path: str | Path | None, overrides=None, base: dict | None = None) -> PipelineConfig:
    """YAML (and `a.b=v` overrides) -> PipelineConfig; sections checked against the trainers.

    `base` gives defaults under the file (the demo embeds its config this way)."""
    from ..config import deep_merge, parse_overrides, read_yaml

    data = dict(base or {})
    if path is not None:
        data = deep_merge(data, read_yaml(path))
    if overrides:
        extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
        data = deep_merge(data, extra)
    source = str(path) if path is not None else "<defaults>"
    cfg = from_dict(PipelineConfig, data, source)
    check_sections(cfg, source)
    return resolve_demo_aliases(cfg)


def resolve_demo_aliases(cfg: PipelineConfig) -> PipelineConfig:
    """`data_dir: demo` is the packaged demo curriculum; `model: demo` the tiny demo model
    (built once into the cache, its tokenizer trained on the demo texts)."""
    if cfg.data_dir == "demo" or cfg.model == "demo":
        from ..demo import DEMO_CURRICULUM_DIR

        if cfg.data_dir == "demo":
            cfg = dataclasses.replace(cfg, data_dir=str(DEMO_CURRICULUM_DIR))
        if cfg.model == "demo":
            from ..data import curriculum_texts
            from ..models.tiny import ensure_demo_model

            path = ensure_demo_model(texts=curriculum_texts(DEMO_CURRICULUM_DIR))
            cfg = dataclasses.replace(cfg, model=str(path))
    return cfg


def resolved_dict(cfg: PipelineConfig) -> dict:
    """The config with every trainer section expanded to its full set of defaults."""
    d = to_dict(cfg)
    for s in SECTIONS:
        val = resolve_section(cfg, s, strict=False)
        val = to_dict(val) if dataclasses.is_dataclass(val) else val
        if s == "reward.train":
            d["reward"]["train"] = val
        else:
            d[s] = val
    return d


__all__ = ["PipelineConfig", "RewardSettings", "EvalSettings", "VerifySettings",
           "EstimateSettings", "load_pipeline_config", "resolve_section", "resolved_dict"]
