"""`mindprint ditto`: DITTO (online DPO of the person's demonstrations over the model's own
samples) against the frozen SFT adapter, one base in memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import click

from ..preference import DITTOConfig


@dataclass
class DITTORunConfig:
    """What `mindprint ditto --config FILE` reads; DITTO's settings live under `ditto:`."""

    model: str = field(default="", metadata={"help": "base model: local directory or hub id"})
    demos: str = field(
        default="", metadata={"help": "a data dir (its SFT records) or JSONL {prompt, completion}"})
    sft_adapter: str | None = field(
        default=None, metadata={"help": "the SFT adapter: the reference, frozen in the policy"})
    adapters: list[str] = field(
        default_factory=list, metadata={"help": "more frozen adapters (e.g. merged units)"})
    out_dir: str = field(
        default="runs/ditto", metadata={"help": "adapter, checkpoint and metrics go here"})
    quantize: int | None = field(
        default=None, metadata={"help": "4 or 8: quantize the base on load (QLoRA); null keeps it"})
    max_demos: int | None = field(
        default=None, metadata={"help": "use only the first N demonstrations (null: all)"})
    ditto: DITTOConfig = field(
        default_factory=DITTOConfig, metadata={"help": "DITTO's settings (DITTOConfig)"})

    def validate(self) -> None:
        from ..config import ConfigError

        for key in ("model", "demos"):
            if not getattr(self, key):
                raise ConfigError(f"key '{key}' is required")
        if self.quantize not in (None, 4, 8):
            raise ConfigError(f"key 'quantize': must be 4, 8 or null, got {self.quantize!r}")
        if self.max_demos is not None and self.max_demos < 1:
            raise ConfigError(f"key 'max_demos': must be >= 1, got {self.max_demos!r}")
        self.ditto.validate()


def run_ditto(cfg: DITTORunConfig, resume: bool = False):
    from ..config import save_config
    from ..stop import graceful_sigint
    from ..preference import train_ditto
    from ..train.policy_adapter import base_weight_bytes
    from ._align import load_base, load_demos

    demos = load_demos(cfg.demos)[: cfg.max_demos]
    model, tok, frozen = load_base(cfg.model, cfg.quantize, cfg.sft_adapter, cfg.adapters)
    out = Path(cfg.out_dir)
    save_config(cfg, out / "ditto_config.yaml")
    with graceful_sigint():
        result = train_ditto(model, tok, demos, cfg.ditto, out, frozen_adapters=frozen, resume=resume)
    return result, base_weight_bytes(model)


@click.command("ditto")
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML config (model, demos, sft_adapter, out_dir, ditto: {...}).")
@click.option("--resume", is_flag=True, help="Continue from out_dir/checkpoint if there is one.")
@click.argument("overrides", nargs=-1)
def ditto(config_path, resume, overrides):
    """DITTO: rounds of sampling the policy and DPO with the demonstrations preferred.

    OVERRIDES are KEY=VALUE pairs, e.g. `ditto.rounds=3 ditto.steps=20 out_dir=runs/x`.
    """
    from ..config import load_config
    from ._align import summary

    cfg = load_config(config_path, DITTORunConfig, list(overrides))
    result, base_bytes = run_ditto(cfg, resume=resume)
    for line in summary(f"DITTO ({result.rounds} rounds)", result, base_bytes,
                        "ditto/memory/peak_bytes", result.loss_first, result.loss_last, "loss"):
        click.echo(line)
