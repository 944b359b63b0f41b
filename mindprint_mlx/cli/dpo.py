"""`mindprint dpo`: DPO on preference pairs against the frozen SFT adapter, one base in memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import click

from ..preference import DPOConfig


@dataclass
class DPORunConfig:
    """What `mindprint dpo --config FILE` reads; DPO hyperparameters live under `dpo:`."""

    model: str = field(default="", metadata={"help": "base model: local directory or hub id"})
    pairs: str = field(
        default="", metadata={"help": "JSONL {prompt, chosen, rejected} or a data dir"})
    sft_adapter: str | None = field(
        default=None, metadata={"help": "the reference, frozen in the policy"})
    adapters: list[str] = field(default_factory=list, metadata={"help": "more frozen adapters"})
    out_dir: str = field(
        default="runs/dpo", metadata={"help": "adapter, checkpoint and metrics go here"})
    quantize: int | None = field(
        default=None, metadata={"help": "4 or 8: quantize the base on load (QLoRA); null keeps it"})
    max_pairs: int | None = field(
        default=None, metadata={"help": "use only the first N pairs (null: all)"})
    dpo: DPOConfig = field(
        default_factory=DPOConfig, metadata={"help": "DPO hyperparameters (DPOConfig)"})

    def validate(self) -> None:
        from ..config import ConfigError

        for key in ("model", "pairs"):
            if not getattr(self, key):
                raise ConfigError(f"key '{key}' is required")
        if self.quantize not in (None, 4, 8):
            raise ConfigError(f"key 'quantize': must be 4, 8 or null, got {self.quantize!r}")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise ConfigError(f"key 'max_pairs': must be >= 1, got {self.max_pairs!r}")
        self.dpo.validate()


def run_dpo(cfg: DPORunConfig, resume: bool = False):
    from ..config import save_config
    from ..stop import graceful_sigint
    from ..preference import train_dpo
    from ..train.policy_adapter import base_weight_bytes
    from ._align import load_base, load_pairs

    pairs = load_pairs(cfg.pairs)[: cfg.max_pairs]
    model, tok, frozen = load_base(cfg.model, cfg.quantize, cfg.sft_adapter, cfg.adapters)
    out = Path(cfg.out_dir)
    save_config(cfg, out / "dpo_config.yaml")
    with graceful_sigint():
        result = train_dpo(model, tok, pairs, cfg.dpo, out, frozen_adapters=frozen, resume=resume)
    return result, base_weight_bytes(model)


@click.command("dpo")
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML config (model, pairs, sft_adapter, out_dir, dpo: {...}).")
@click.option("--resume", is_flag=True, help="Continue from out_dir/checkpoint if there is one.")
@click.argument("overrides", nargs=-1)
def dpo(config_path, resume, overrides):
    """Direct preference optimisation of a LoRA adapter over the frozen SFT adapter.

    OVERRIDES are KEY=VALUE pairs, e.g. `dpo.steps=50 dpo.beta=0.1 out_dir=runs/x`.
    """
    from ..config import load_config
    from ._align import summary

    cfg = load_config(config_path, DPORunConfig, list(overrides))
    result, base_bytes = run_dpo(cfg, resume=resume)
    for line in summary("DPO", result, base_bytes, "dpo/memory/peak_bytes", result.loss_first,
                        result.loss_last, "loss"):
        click.echo(line)
