"""A standalone PPO run (`mindprint ppo`): what it reads and writes, its prompts, and the run
itself: one base in memory with the frozen adapters and the reward model, then `train_ppo`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..data.prompts import load_base, load_prompts
from .trainer import PPOConfig


@dataclass
class PPORun:
    """What a standalone PPO run reads and writes; the hyperparameters are a PPOConfig."""

    model: str = field(default="", metadata={"help": "base model: local directory or hub id"})
    prompts: str = field(
        default="", metadata={"help": "JSONL ({prompt} or {messages}) or a data dir's SFT prompts"})
    reward_model: str = field(
        default="", metadata={"help": "reward-model directory (adapter 'reward' + head)"})
    sft_adapter: str | None = field(
        default=None, metadata={"help": "the SFT adapter: the reference, frozen in the policy"})
    adapters: list[str] = field(
        default_factory=list, metadata={"help": "more frozen adapters (e.g. merged units)"})
    out_dir: str = field(
        default="runs/ppo", metadata={"help": "ppo_adapter/, checkpoint/, metrics.jsonl go here"})
    quantize: int | None = field(
        default=None, metadata={"help": "4 or 8: quantize the base on load (QLoRA); null keeps it"})
    max_prompts: int | None = field(
        default=None, metadata={"help": "use only the first N prompts (null: all)"})

    def validate(self) -> None:
        from ..config import ConfigError

        for key in ("model", "prompts", "reward_model"):
            if not getattr(self, key):
                raise ConfigError(f"key '{key}' is required")
        if self.quantize not in (None, 4, 8):
            raise ConfigError(f"key 'quantize': must be 4, 8 or null, got {self.quantize!r}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ConfigError(f"key 'max_prompts': must be >= 1, got {self.max_prompts!r}")


def run_ppo(run: PPORun, cfg: PPOConfig, resume: bool = False):
    """Load the base once, add the adapters and the reward model, and train; returns the
    PPOResult and the base weights' bytes. Writes the run's config to out_dir/ppo_config.yaml."""
    from ..config import save_config, to_dict
    from ..models import lora
    from ..stop import graceful_sigint
    from ..train.reward import RewardModel
    from .trainer import base_weight_bytes, train_ppo

    model, tok, frozen = load_base(run.model, run.quantize, run.sft_adapter, run.adapters)
    reward = RewardModel.load(model, tok, run.reward_model)
    lora.set_active(model, frozen)
    prompts = load_prompts(run.prompts)[: run.max_prompts]
    out = Path(run.out_dir)
    save_config({**to_dict(run), "ppo": to_dict(cfg)}, out / "ppo_config.yaml")
    with graceful_sigint():   # first Ctrl-C: checkpoint after this step and stop
        result = train_ppo(model, tok, prompts, reward.score_tokens, cfg, out,
                           frozen_adapters=frozen, resume=resume, reward_head=reward.head)
    return result, base_weight_bytes(model)
