"""`mindprint ppo`: PPO on a prompts file with an SFT adapter and a reward model, one base in memory."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import click

from ..ppo.trainer import PPOConfig


@dataclass
class PPORunConfig:
    """What `mindprint ppo --config FILE` reads; PPO hyperparameters live under `ppo:`."""

    model: str = ""                       # base model: local directory or hub id
    prompts: str = ""                     # JSONL ({"prompt": ...} or {"messages": [...]}) or a data dir
    reward_model: str = ""                # reward-model directory (adapter "reward" + head)
    sft_adapter: str | None = None        # the SFT adapter: the reference, frozen in the policy
    adapters: list[str] = field(default_factory=list)   # more frozen adapters (e.g. merged units)
    out_dir: str = "runs/ppo"
    quantize: int | None = None           # 4 or 8: quantize the base on load (QLoRA)
    max_prompts: int | None = None
    value_head_init: str = "zero"         # zero | reward: the same as ppo.value_head_init (either turns it on)
    ppo: PPOConfig = field(default_factory=PPOConfig)

    def validate(self) -> None:
        from ..config import ConfigError

        for key in ("model", "prompts", "reward_model"):
            if not getattr(self, key):
                raise ConfigError(f"key '{key}' is required")
        if self.quantize not in (None, 4, 8):
            raise ConfigError(f"key 'quantize': must be 4, 8 or null, got {self.quantize!r}")
        if self.value_head_init not in ("zero", "reward"):
            raise ConfigError(f"key 'value_head_init': must be zero or reward, got {self.value_head_init!r}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ConfigError(f"key 'max_prompts': must be >= 1, got {self.max_prompts!r}")
        self.ppo.validate()


def _jsonl_prompts(path: Path) -> list:
    from ..errors import MindprintError

    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise MindprintError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise MindprintError(f"{path}:{n}: expected an object with 'prompt' or 'messages'")
        if "prompt" in rec:
            p = rec["prompt"]
        elif "messages" in rec:
            p = list(rec["messages"])
            while p and isinstance(p[-1], dict) and p[-1].get("role") == "assistant":
                p = p[:-1]              # the prompt is everything before the answer
        else:
            raise MindprintError(f"{path}:{n}: needs a 'prompt' or 'messages' key "
                                 f"(has: {', '.join(sorted(rec)) or 'none'})")
        ok = isinstance(p, str) and p.strip() or isinstance(p, list) and p and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in p)
        if not ok:
            raise MindprintError(f"{path}:{n}: the prompt must be a non-empty string or a list of "
                                 "{role, content} messages")
        prompts.append(p)
    if not prompts:
        raise MindprintError(f"{path}: no prompts")
    return prompts


def load_prompts(path: str | Path) -> list:
    """Prompts from a JSONL file, or the SFT prompts of a data directory."""
    from ..errors import MindprintError

    p = Path(path)
    if p.is_dir():
        from ..data import load_data_dir

        ds = load_data_dir(p, require=("sft",))
        prompts = [list(r.prompt) for r in ds.sft]
        if not prompts:
            raise MindprintError(f"{p}: no SFT records to take prompts from")
        return prompts
    if not p.is_file():
        raise MindprintError(f"prompts file not found: {p}")
    return _jsonl_prompts(p)


def run_ppo(cfg: PPORunConfig, resume: bool = False):
    """Load the base once, add the adapters and the reward model, and train."""
    from ..config import save_config
    from ..models import load, lora
    from ..models.adapters import load_adapter
    from ..ppo import base_weight_bytes, train_ppo
    from ..train.reward import RewardModel

    model, tok = load(cfg.model, quantize=cfg.quantize)
    frozen = []
    for i, d in enumerate(([cfg.sft_adapter] if cfg.sft_adapter else []) + list(cfg.adapters)):
        frozen.append(load_adapter(model, d, name="sft" if i == 0 and cfg.sft_adapter else f"frozen{i}",
                                   trainable=False))
    reward = RewardModel.load(model, tok, cfg.reward_model)
    lora.set_active(model, frozen)
    if cfg.value_head_init == "reward":
        cfg.ppo.value_head_init = "reward"
    prompts = load_prompts(cfg.prompts)[: cfg.max_prompts]
    out = Path(cfg.out_dir)
    save_config(cfg, out / "ppo_config.yaml")
    from ..stop import graceful_sigint

    with graceful_sigint():   # first Ctrl-C: checkpoint after this step and stop
        result = train_ppo(model, tok, prompts, reward.score_tokens, cfg.ppo, out,
                           frozen_adapters=frozen, resume=resume, reward_head=reward.head)
    return result, base_weight_bytes(model)


@click.command("ppo")
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML config (model, prompts, reward_model, sft_adapter, out_dir, ppo: {...}).")
@click.option("--resume", is_flag=True, help="Continue from out_dir/checkpoint if there is one.")
@click.argument("overrides", nargs=-1)
def ppo(config_path, resume, overrides):
    """Refine a policy with PPO against a reward model (LoRA r=1 on one shared base).

    OVERRIDES are KEY=VALUE pairs, e.g. `ppo.steps=50 ppo.learning_rate=1e-5 out_dir=runs/x`.
    """
    from ..config import load_config

    cfg = load_config(config_path, PPORunConfig, list(overrides))
    result, base_bytes = run_ppo(cfg, resume=resume)
    last = result.history[-1] if result.history else {}
    click.echo(f"PPO: {result.steps} steps; mean score {result.mean_score_first:.4g} -> "
               f"{result.mean_score_last:.4g}; KL {last.get('objective/kl', float('nan')):.4g}; "
               f"peak memory {last.get('ppo/memory/peak_bytes', 0) / 2**20:.1f} MiB "
               f"(base weights {base_bytes / 2**20:.1f} MiB)")
    click.echo(f"adapter: {result.adapter_dir}")
