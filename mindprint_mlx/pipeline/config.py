"""`PipelineConfig`: everything a curriculum run needs, loaded from YAML with checked keys.

Every section is a typed dataclass: the trainers' own configs (`sft: SFTConfig`,
`ppo: PPOConfig`, `reward.train: RewardConfig`, `adaptive: AdaptiveBounds`) and the
pipeline's settings, so a mistyped key anywhere is an error naming the key and the file.
Where the pipeline's default differs from a trainer's (`ppo.reward_norm`), the field's
default says so and a YAML section is merged over it (`config.from_dict`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..config import ConfigError, from_dict, to_dict
from ..data.adaptive import AdaptiveBounds
from ..evaluate import QuizWeights
from ..grpo.trainer import GRPOConfig
from ..ppo.trainer import PPOConfig
from ..preference.ditto import DITTOConfig
from ..preference.dpo import DPOConfig
from ..train.reward import RewardConfig
from ..train.sft import SFTConfig
from .refine import RefineSettings, check_config as check_refine


@dataclass
class LabelSettings:
    """Preference labels on the SFT policy's own answers (mindprint_mlx.labels), which the
    reward model trains on beside the person's pairs: a judge's, labelled in the run, and/or
    a file of them (e.g. written by `mindprint label`)."""

    judge: Optional[str] = field(
        default=None,
        metadata={"help": "FILE.py:FUNC or package.module:FUNC, FUNC(prompt, answer) -> score: "
                          "ranks `samples` answers a practice prompt of an SFT policy trained on "
                          "every topic's SFT data (None: no judge)"})
    file: Optional[str] = field(
        default=None,
        metadata={"help": "a JSONL file of preference records (preference_data.jsonl's format) "
                          "labelled on the policy's answers, e.g. by `mindprint label`"})
    samples: int = field(default=4, metadata={"help": "answers the judge ranks a practice prompt"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature of those answers"})
    min_gap: float = field(
        default=0.05, metadata={"help": "judge scores closer than this are a tie (no pair)"})

    def validate(self) -> None:
        if self.samples < 2:
            raise ConfigError(f"key 'reward.labels.samples': must be >= 2, got {self.samples}")
        if not self.temperature > 0:
            raise ConfigError(f"key 'reward.labels.temperature': must be > 0, got {self.temperature}")
        if not self.min_gap >= 0:
            raise ConfigError(f"key 'reward.labels.min_gap': must be >= 0, got {self.min_gap}")
        if self.file is not None and not Path(self.file).is_file():
            raise ConfigError(f"key 'reward.labels.file': {self.file} is not a file")


@dataclass
class RewardSection:
    """The reward model: trained once per run (into run_dir/reward_model) or reused."""

    path: Optional[str] = field(
        default=None, metadata={"help": "an existing reward-model directory to reuse (no training)"})
    train: RewardConfig = field(
        default_factory=RewardConfig, metadata={"help": "how it is trained (RewardConfig)"})
    continue_at_chance: bool = field(
        default=False,
        metadata={"help": "go on to PPO with a reward model at chance validation accuracy"})
    contrast_samples: int = field(
        default=0,
        metadata={"help": "answers the base model samples per person-written answer (SFT answers, "
                          "the reward half's chosen ones), each a rejected answer to it (0: none)"})
    contrast_temperature: float = field(
        default=1.0, metadata={"help": "sampling temperature of those base-model answers"})
    labels: LabelSettings = field(
        default_factory=LabelSettings,
        metadata={"help": "preference labels on the SFT policy's own answers (LabelSettings)"})

    def validate(self) -> None:
        if self.contrast_samples < 0:
            raise ConfigError(f"key 'reward.contrast_samples': must be >= 0, got {self.contrast_samples}")
        if not self.contrast_temperature > 0:
            raise ConfigError("key 'reward.contrast_temperature': must be > 0, got "
                              f"{self.contrast_temperature}")


@dataclass
class EvalSettings:
    """The quiz evaluation of each topic (see mindprint_mlx.evaluate)."""

    max_tokens: int = field(default=64, metadata={"help": "answer length per quiz question (greedy)"})
    max_questions: int = field(
        default=16, metadata={"help": "quiz questions used per topic (the first N)"})
    weights: QuizWeights = field(
        default_factory=QuizWeights, metadata={"help": "weights of the quiz score's parts"})
    reward_samples: int = field(
        default=2, metadata={"help": "sampled answers per prompt for the mean reward around PPO"})
    judge: str = field(
        default="split",
        metadata={"help": "quiz preference part: split (a second reward model), reward, or a dir"})
    retention: bool = field(
        default=True, metadata={"help": "re-quiz every earlier topic after each topic"})

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

    tolerance: float = field(
        default=0.05, metadata={"help": "a quiz score drop larger than this is a regression"})
    stop_on_regression: bool = field(
        default=False, metadata={"help": "stop the run on a regression (else report it, go on)"})


@dataclass
class MergeSettings:
    """How each unit's adapters are merged, and so how big the final adapter is (pipeline/merge.py)."""

    mode: str = field(default="concat", metadata={
        "help": "concat (ranks add up) | svd (compress each unit to `rank`) | fold_into_base"})
    rank: int = field(default=0, metadata={
        "help": "svd's target rank; 0: the most one topic adds (sft.lora_rank + ppo.lora_rank)"})
    repair_epochs: int = field(default=0, metadata={
        "help": "svd: after each compression, epochs of SFT (sft's settings) of the compressed "
                "adapter on every trained topic's SFT records; 0: no repair"})

    def validate(self) -> None:
        modes = ("concat", "svd", "fold_into_base")
        if self.mode not in modes:
            raise ConfigError(f"key 'merge.mode': must be one of {', '.join(modes)}, got {self.mode!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ConfigError(f"key 'merge.rank': must be an integer >= 0 (0: one topic's rank), "
                              f"got {self.rank!r}")
        if self.rank and self.mode != "svd":
            raise ConfigError(f"key 'merge.rank': only merge.mode svd uses it (mode is {self.mode})")
        r = self.repair_epochs
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ConfigError(f"key 'merge.repair_epochs': must be an integer >= 0 (0: off), got {r!r}")
        if r and self.mode != "svd":
            raise ConfigError(f"key 'merge.repair_epochs': only merge.mode svd uses it (mode is {self.mode})")


@dataclass
class EstimateSettings:
    """Assumptions of the dry run's time estimate (no effect on training)."""

    tflops: float = field(
        default=0.0,
        metadata={"help": "sustained training TFLOP/s; 0: 8 on Apple silicon, 0.05 elsewhere"})


def _pipeline_ppo() -> PPOConfig:
    # PPO's scores are normalised (gain and bias fitted on SFT-policy samples at the start of
    # the phase): value clipping and the KL coefficient assume scores of order 1, and a reward
    # model's raw scale is arbitrary. The standalone trainer keeps the classic default (off).
    return PPOConfig(reward_norm="sft_samples")


@dataclass
class PipelineConfig:
    """A curriculum run: reward model once; per topic SFT -> quiz -> PPO if below the
    threshold -> final quiz; after each unit merge, verify, continue on merged weights."""

    model: str = field(
        default="", metadata={"help": "base model: local Hugging Face directory or hub id"})
    data_dir: str = field(
        default="", metadata={"help": "curriculum data directory (JSONL files, persona)"})
    run_dir: str = field(
        default="runs/mindprint", metadata={"help": "everything the run writes goes here"})
    quantize: Optional[int] = field(
        default=None, metadata={"help": "quantize the base on load: 4 or 8 (QLoRA); null keeps it"})
    seed: int = field(default=0, metadata={
        "help": "the run's seed: model load, splits, sampling; added to every trainer's own seed"})
    units: list[str] = field(
        default_factory=list, metadata={"help": "only these units (empty: all)"})
    topics: list[str] = field(
        default_factory=list, metadata={"help": "only these topics (empty: all)"})
    reward: RewardSection = field(
        default_factory=RewardSection, metadata={"help": "the reward model PPO climbs"})
    sft: SFTConfig = field(
        default_factory=SFTConfig,
        metadata={"help": "SFT of every topic (adaptive sets epochs, batch size, lr scale)"})
    ppo: PPOConfig = field(
        default_factory=_pipeline_ppo,
        metadata={"help": "PPO of a topic below its threshold (default reward_norm: sft_samples)"})
    refine: RefineSettings = field(
        default_factory=RefineSettings,
        metadata={"help": "the method that refines a topic below its threshold (run-wide, per topic)"})
    grpo: GRPOConfig = field(
        default_factory=GRPOConfig,
        metadata={"help": "GRPO / RLOO of a topic (refine.method grpo or rloo sets its method)"})
    dpo: DPOConfig = field(
        default_factory=DPOConfig, metadata={"help": "DPO of a topic on its preference pairs"})
    ditto: DITTOConfig = field(
        default_factory=DITTOConfig, metadata={"help": "DITTO of a topic on its SFT demonstrations"})
    adaptive: AdaptiveBounds = field(
        default_factory=AdaptiveBounds, metadata={"help": "per-topic settings from data quality"})
    run_ppo: bool = field(
        default=True, metadata={"help": "false: never refine (no PPO or other refine method)"})
    eval: EvalSettings = field(default_factory=EvalSettings, metadata={"help": "the quiz"})
    verify: VerifySettings = field(
        default_factory=VerifySettings, metadata={"help": "the check after each unit's merge"})
    merge: MergeSettings = field(
        default_factory=MergeSettings, metadata={"help": "how each unit's adapters merge (docs/merge.md)"})
    estimate: EstimateSettings = field(
        default_factory=EstimateSettings, metadata={"help": "the dry run's time estimate"})

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
        if self.merge.mode == "fold_into_base" and self.quantize:
            raise ConfigError("key 'merge.mode': fold_into_base writes full-precision base checkpoints; "
                              "it cannot fold into a base quantized on load (quantize: null)")
        # Topic adapters are folded into one unit adapter per layer (ranks concatenate), and
        # an mlx-lm adapter file has one rank for every layer: SFT and every refine method
        # the run uses cover the same layers (refine.check_config).
        check_refine(self)


def load_pipeline_config(path: str | Path | None, overrides=None, base: dict | None = None) -> PipelineConfig:
    """YAML (and `a.b=v` overrides) -> PipelineConfig, every section checked.

    `base` gives defaults under the file (the demo embeds its config this way)."""
    from ..config import deep_merge, parse_overrides, read_yaml

    data = dict(base or {})
    if path is not None:
        data = deep_merge(data, read_yaml(path))
    if overrides:
        extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
        data = deep_merge(data, extra)
    source = str(path) if path is not None else "<defaults>"
    return resolve_demo_aliases(from_dict(PipelineConfig, data, source))


def resolve_demo_aliases(cfg: PipelineConfig) -> PipelineConfig:
    """`data_dir: demo` is the packaged demo curriculum; `model: demo` the tiny demo model
    (built once into the cache, its tokenizer trained on the demo texts)."""
    if cfg.data_dir == "demo" or cfg.model == "demo":
        from ..demo import DEMO_CURRICULUM_DIR

        if cfg.data_dir == "demo":
            cfg = dataclasses.replace(cfg, data_dir=str(DEMO_CURRICULUM_DIR))
        if cfg.model == "demo":
            from ..models.tiny import demo_model

            cfg = dataclasses.replace(cfg, model=str(demo_model()))
    return cfg


def resolved_dict(cfg: PipelineConfig) -> dict:
    """The config as run.json records it: every section with its full set of values."""
    return to_dict(cfg)


__all__ = ["PipelineConfig", "RewardSection", "EvalSettings", "VerifySettings",
           "EstimateSettings", "MergeSettings", "load_pipeline_config", "resolved_dict"]
