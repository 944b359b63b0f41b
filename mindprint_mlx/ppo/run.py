"""A standalone PPO run (`mindprint ppo`): what it reads and writes, its prompts, and the run
itself: one base in memory with the frozen adapters and the reward model, then `train_ppo`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MindprintError
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


def _jsonl_prompts(path: Path) -> list:
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


def run_ppo(run: PPORun, cfg: PPOConfig, resume: bool = False):
    """Load the base once, add the adapters and the reward model, and train; returns the
    PPOResult and the base weights' bytes. Writes the run's config to out_dir/ppo_config.yaml."""
    from ..config import save_config, to_dict
    from ..models import load, lora
    from ..models.adapters import load_adapter
    from ..pipeline.interrupt import graceful_sigint
    from ..train.reward import RewardModel
    from .trainer import base_weight_bytes, train_ppo

    model, tok = load(run.model, quantize=run.quantize)
    frozen = []
    for i, d in enumerate(([run.sft_adapter] if run.sft_adapter else []) + list(run.adapters)):
        frozen.append(load_adapter(model, d, name="sft" if i == 0 and run.sft_adapter else f"frozen{i}",
                                   trainable=False))
    reward = RewardModel.load(model, tok, run.reward_model)
    lora.set_active(model, frozen)
    prompts = load_prompts(run.prompts)[: run.max_prompts]
    out = Path(run.out_dir)
    save_config({**to_dict(run), "ppo": to_dict(cfg)}, out / "ppo_config.yaml")
    with graceful_sigint():   # first Ctrl-C: checkpoint after this step and stop
        result = train_ppo(model, tok, prompts, reward.score_tokens, cfg, out,
                           frozen_adapters=frozen, resume=resume, reward_head=reward.head)
    return result, base_weight_bytes(model)
