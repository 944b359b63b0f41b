"""DITTO (Shaikh et al., ICLR 2025, "Show, don't tell"): align to a person from a handful
of demonstrations by rounds of online DPO in which the person's demonstration is
preferred over the current policy's own samples.

Round r: sample the current policy (frozen adapters + the trainable adapter)
`samples_per_prompt` times on every demonstration's prompt; the pairs are
(demonstration > sample) for this round's samples and, with `replay`, every earlier
round's samples too (older policies' answers stay rejected); then `steps` DPO steps on
those pairs against the fixed reference (the frozen adapters). Samples equal to the
demonstration are dropped (such a pair has no gradient).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import distributed as dist
from ..config import check_values
from ..errors import MindprintError
from ..models import lora
from ..ppo.rollout import generate_batch
from ..train import policy_adapter as pa
from .dpo import SALT_ORDER, DPOConfig, DPOTrainer, EncodedPair

SALT_SAMPLE = 59


@dataclass
class DITTOConfig(DPOConfig):
    """DPO's settings (`steps` = DPO steps per round) plus the rounds of sampling."""

    steps: int = field(default=10, metadata={"help": "DPO steps per round"})
    rounds: int = field(default=3, metadata={"help": "sample-then-DPO rounds"})
    samples_per_prompt: int = field(
        default=2, metadata={"help": "policy samples per demonstration per round"})
    replay: bool = field(
        default=True, metadata={"help": "earlier rounds' samples stay in as rejected answers"})
    max_new_tokens: int = field(
        default=64, metadata={"help": "length of the policy's samples (tokens)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling (1.0: off)"})
    sample_batch_size: int = field(
        default=16, metadata={"help": "prompts per batched sampling call"})
    adapter_name: str = field(
        default="ditto", metadata={"help": "name of the trained LoRA adapter"})

    def validate(self) -> None:
        check_values(self, self._checks() + [
            ("rounds", self.rounds >= 1), ("samples_per_prompt", self.samples_per_prompt >= 1),
            ("max_new_tokens", self.max_new_tokens >= 1), ("temperature", self.temperature > 0),
            ("top_p", 0 < self.top_p <= 1), ("sample_batch_size", self.sample_batch_size >= 1)])


@dataclass
class DITTOResult:
    adapter_dir: Path
    steps: int
    rounds: int
    loss_first: float
    loss_last: float
    history: list[dict]
    pairs_per_round: list[int] = field(default_factory=list)


def _demo(d: Any, i: int) -> tuple[Any, str]:
    if hasattr(d, "prompt") and hasattr(d, "completion"):
        return d.prompt, d.completion
    if isinstance(d, dict) and "prompt" in d and "completion" in d:
        return d["prompt"], d["completion"]
    if isinstance(d, (tuple, list)) and len(d) == 2:
        return d[0], d[1]
    raise MindprintError(f"demonstration {i}: expected an SFTRecord, a {{prompt, completion}} "
                         "dict or a (prompt, completion) pair")


class DITTOTrainer(DPOTrainer):
    role = "ditto"

    def __init__(self, model: nn.Module, tokenizer, cfg: DITTOConfig, demos: Sequence[Any],
                 frozen_adapters: Sequence[str] = ()):
        super().__init__(model, tokenizer, cfg, frozen_adapters)
        from ..data.batching import encode_pair

        self.demos = []                       # (chosen tokens, prompt length)
        for i, d in enumerate(demos):
            prompt, completion = _demo(d, i)
            tokens, n, _ = encode_pair(tokenizer, prompt, completion, cfg.max_seq_length)
            self.demos.append((tokens, n))
        self.samples: dict[int, list[list]] = {}   # round -> [[demo index, response tokens]]

    def sample_round(self, r: int) -> dict:
        """Draw round r's samples from the current policy (the same on every rank)."""
        cfg = self.cfg
        jobs = [i for i in range(len(self.demos)) for _ in range(cfg.samples_per_prompt)]
        got, lengths, ended = [], [], []
        with lora.active_adapters(self.model, self.policy_adapters):
            for c, s in enumerate(range(0, len(jobs), cfg.sample_batch_size)):
                chunk = jobs[s:s + cfg.sample_batch_size]
                prompts = [self.demos[i][0][:self.demos[i][1]] for i in chunk]
                gen = generate_batch(self.model, prompts, cfg.max_new_tokens, self.eos_ids,
                                     self.pad_id, cfg.temperature, cfg.top_p,
                                     pa.step_key(cfg.seed, r * 100_003 + c, SALT_SAMPLE))
                resp, rl = np.array(gen.response_tokens), np.array(gen.response_lengths)
                for i, row, n, e in zip(chunk, resp, rl, np.array(gen.ended)):
                    got.append([i, [int(t) for t in row[:n]]])
                    lengths.append(int(n))
                    ended.append(bool(e))
        self.samples[r] = got
        return {"ditto/round": r + 1, "ditto/sample_length": float(np.mean(lengths)),
                "ditto/sample_eos_fraction": float(np.mean(ended))}

    def round_pairs(self, r: int) -> list[EncodedPair]:
        rounds = range(r + 1) if self.cfg.replay else [r]
        out = []
        for q in rounds:
            for i, resp in self.samples[q]:
                tokens, n = self.demos[i]
                if list(tokens[n:]) == list(resp):
                    continue
                rejected = (list(tokens[:n]) + list(resp))[:self.cfg.max_seq_length]
                if len(rejected) <= n:
                    continue
                out.append(EncodedPair(list(tokens), n, rejected, n))
        return out

    def state(self) -> dict:
        return {**super().state(), "samples": {str(k): v for k, v in self.samples.items()}}


def train_ditto(model: nn.Module, tokenizer, demos: Sequence[Any], cfg: DITTOConfig,
                out_dir: str | Path, frozen_adapters: Sequence[str] = (), resume: bool = False,
                metrics_path: str | Path | None = None,
                on_step: Callable[[int, dict], None] | None = None) -> DITTOResult:
    """Train the `cfg.adapter_name` adapter with DITTO on the person's demonstrations
    (SFTRecords, {prompt, completion} dicts or (prompt, completion) pairs).

    cfg.rounds * cfg.steps DPO steps in all. The reference is `frozen_adapters` (normally
    the SFT adapter the demonstrations trained). Writes out_dir/checkpoint/ (with every
    round's samples: a resume continues exactly), out_dir/metrics.jsonl and the adapter
    to out_dir/ditto_adapter. Data parallel: every rank draws the same samples (same
    key, same weights) and takes its share of each DPO batch.
    """
    if not demos:
        raise MindprintError("train_ditto: no demonstrations")
    out = Path(out_dir)
    ckpt = out / "checkpoint"
    metrics = Path(metrics_path) if metrics_path else out / "metrics.jsonl"
    saved_active = lora.get_active(model)
    trainer = DITTOTrainer(model, tokenizer, cfg, demos, frozen_adapters)
    rank, world, _ = dist.world()
    pairs_per_round: dict[int, int] = {}
    try:
        state = pa.restore_or_start(ckpt, metrics, model, trainer.optimizer, resume, "ditto")
        if state is not None:
            trainer.step, trainer.history = int(state["step"]), list(state.get("history", []))
            trainer.samples = {int(k): v for k, v in state.get("samples", {}).items()}
        mx.reset_peak_memory()
        cache: dict[int, list[EncodedPair]] = {}

        def do_step(step: int) -> dict:
            r, local = divmod(step, cfg.steps)
            extra = {}
            if r not in trainer.samples:
                extra = trainer.sample_round(r)
            if r not in cache:
                cache.clear()
                cache[r] = trainer.round_pairs(r)
                if not cache[r]:
                    raise MindprintError(f"ditto: round {r + 1}: every sample equals its "
                                         "demonstration; nothing to learn from")
            pairs = cache[r]
            pairs_per_round[r] = len(pairs)
            idx = pa.cycled_indices(len(pairs), local, cfg.batch_size, cfg.seed, SALT_ORDER + 1000 * r)
            stats = trainer.train_step([pairs[i] for i in idx[rank::world]])
            return {"ditto/round": r + 1, "ditto/pairs": len(pairs), **extra, **stats,
                    **pa.memory_stats("ditto", trainer.base_bytes)}

        pa.run_steps("ditto", cfg.rounds * cfg.steps, trainer.step, do_step,
                     lambda: trainer.save(ckpt, {"history": trainer.history}), ckpt, metrics,
                     cfg.save_every, cfg.progress, trainer.norm_start,
                     lambda: pa.adapter_norm(model, cfg.adapter_name), trainer.history, on_step,
                     bar_keys=("ditto/round", "loss", "rewards/margins"),
                     hint="lower ditto.learning_rate or raise ditto.beta")
    finally:
        pa.finish(model, cfg.adapter_name, saved_active)
    adapter_dir = out / "ditto_adapter"
    if dist.is_main():
        trainer.save_final(adapter_dir, trainer.step, {"rounds": cfg.rounds})
    hist = trainer.history
    return DITTOResult(adapter_dir, trainer.step, cfg.rounds, hist[0]["loss"] if hist else float("nan"),
                       hist[-1]["loss"] if hist else float("nan"), hist,
                       [pairs_per_round[k] for k in sorted(pairs_per_round)])
