"""`mindprint grpo`: GRPO or (with --method rloo) RLOO against a reward model, over the frozen
SFT adapter, one base in memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import click

from ..grpo import GRPOConfig


@dataclass
class GRPORunConfig:
    """What `mindprint grpo --config FILE` reads; the settings live under `grpo:`."""

    model: str = field(default="", metadata={"help": "base model: local directory or hub id"})
    prompts: str = field(
        default="",
        metadata={"help": "JSONL ({\"prompt\": ...} or {\"messages\": [...]}) or a data dir"})
    reward_model: str = field(
        default="", metadata={"help": "reward-model directory (adapter \"reward\" + head)"})
    sft_adapter: str | None = field(
        default=None, metadata={"help": "the SFT adapter: the reference, frozen in the policy"})
    adapters: list[str] = field(
        default_factory=list, metadata={"help": "more frozen adapters (e.g. merged units)"})
    out_dir: str = field(
        default="runs/grpo", metadata={"help": "adapter, checkpoint and metrics go here"})
    quantize: int | None = field(
        default=None, metadata={"help": "4 or 8: quantize the base on load (QLoRA); null keeps it"})
    max_prompts: int | None = field(
        default=None, metadata={"help": "use only the first N prompts (null: all)"})
    grpo: GRPOConfig = field(
        default_factory=GRPOConfig, metadata={"help": "GRPO / RLOO hyperparameters (GRPOConfig)"})

    def validate(self) -> None:
        from ..config import ConfigError

        for key in ("model", "prompts", "reward_model"):
            if not getattr(self, key):
                raise ConfigError(f"key '{key}' is required")
        if self.quantize not in (None, 4, 8):
            raise ConfigError(f"key 'quantize': must be 4, 8 or null, got {self.quantize!r}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ConfigError(f"key 'max_prompts': must be >= 1, got {self.max_prompts!r}")
        self.grpo.validate()


def run_grpo(cfg: GRPORunConfig, resume: bool = False):
    from ..config import save_config
    from ..grpo import train_grpo
    from ..stop import graceful_sigint
    from ..train.policy_adapter import base_weight_bytes
    from ..train.reward import RewardModel
    from ._align import load_base, load_prompts

    prompts = load_prompts(cfg.prompts)[: cfg.max_prompts]
    model, tok, frozen = load_base(cfg.model, cfg.quantize, cfg.sft_adapter, cfg.adapters)
    reward = RewardModel.load(model, tok, cfg.reward_model)
    from ..models import lora
    lora.set_active(model, frozen)
    out = Path(cfg.out_dir)
    save_config(cfg, out / f"{cfg.grpo.method}_config.yaml")
    with graceful_sigint():
        result = train_grpo(model, tok, prompts, reward.score_tokens, cfg.grpo, out,
                            frozen_adapters=frozen, resume=resume)
    return result, base_weight_bytes(model)


@click.command("grpo")
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML config (model, prompts, reward_model, sft_adapter, out_dir, grpo: {...}).")
@click.option("--method", type=click.Choice(["grpo", "rloo"]), default=None,
              help="grpo (group-normalised advantages, KL in the loss) or rloo (leave-one-out "
                   "baseline, KL on the score); the same as grpo.method.")
@click.option("--resume", is_flag=True, help="Continue from out_dir/checkpoint if there is one.")
@click.argument("overrides", nargs=-1)
def grpo(config_path, method, resume, overrides):
    """Refine a policy with GRPO or RLOO against a reward model: k samples per prompt, no critic.

    OVERRIDES are KEY=VALUE pairs, e.g. `grpo.steps=50 grpo.group_size=8 out_dir=runs/x`.
    """
    from ..config import load_config
    from ._align import summary

    extra = [f"grpo.method={method}"] if method else []
    cfg = load_config(config_path, GRPORunConfig, list(overrides) + extra)
    result, base_bytes = run_grpo(cfg, resume=resume)
    m = cfg.grpo.method
    for line in summary(m.upper(), result, base_bytes, f"{m}/memory/peak_bytes",
                        result.mean_score_first, result.mean_score_last, "mean score"):
        click.echo(line)
