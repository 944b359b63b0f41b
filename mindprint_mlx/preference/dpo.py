"""DPO on one base in memory: the reference is the frozen adapters, the policy is them plus
one trainable LoRA adapter; reference log-probabilities come from the same weights with
that adapter switched off (never a second model).

Rows are laid out as SFT lays them out (`data.batching.encode_pair`: chat-templated
prompt, answer, EOS); a pair's chosen and rejected rows go through one forward pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import distributed as dist
from ..config import check_values, to_dict
from ..errors import MindprintError
from ..models import lora
from ..models.adapters import save_adapter
from ..ppo.rollout import response_forward
from ..train import policy_adapter as pa
from ..train.loop import gradient_checkpointing
from .losses import DPO_LOSS_TYPES, dpo_loss, rpo_nll, sequence_logps

log = logging.getLogger(__name__)

SALT_INIT, SALT_ORDER = 47, 53


@dataclass
class DPOConfig:
    """DPO hyperparameters (defaults: TRL's beta and loss; a LoRA-sized learning rate)."""

    steps: int = field(
        default=100, metadata={"help": "optimizer steps; pairs are cycled in seeded epochs"})
    batch_size: int = field(default=4, metadata={"help": "preference pairs per optimizer step"})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "micro-batches per step (must divide batch_size)"})
    learning_rate: float = field(default=5e-5, metadata={"help": "peak learning rate (Adam)"})
    beta: float = field(
        default=0.1, metadata={"help": "strength of the implicit KL to the reference"})
    loss_type: Literal["sigmoid", "ipo"] = field(
        default="sigmoid", metadata={"help": "sigmoid (DPO) or ipo"})
    label_smoothing: float = field(
        default=0.0, metadata={"help": "conservative DPO (sigmoid only), in [0, 0.5)"})
    rpo_alpha: float | None = field(
        default=None, metadata={"help": "RPO: + alpha x the chosen answer's per-token NLL "
                                        "(keeps the preferred answers likely; null: off)"})
    max_seq_length: int = field(
        default=512, metadata={"help": "tokens per row (prompt + answer + EOS)"})
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "global gradient-norm clip (null: off)"})
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW's decoupled weight decay (0: plain Adam)"})
    adam_bias_correction: bool = field(
        default=True, metadata={"help": "bias-corrected Adam, as torch.optim.Adam"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "Adam's epsilon (torch's default)"})
    seed: int = field(default=0, metadata={"help": "pair order and adapter init"})
    adapter_name: str = field(default="dpo", metadata={"help": "name of the trained LoRA adapter"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_targets: list[str] = field(
        default_factory=lambda: list(lora.DEFAULT_TARGETS),
        metadata={"help": "linear layers that get LoRA (names inside a decoder layer)"})
    num_layers: int = field(
        default=0, metadata={"help": "LoRA on the last N decoder layers; 0 = all"})
    grad_checkpoint: bool = field(
        default=False, metadata={"help": "recompute layer activations in backward (less memory)"})
    save_every: int = field(
        default=10, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def _checks(self) -> list[tuple[str, bool]]:
        n = dist.size()
        per_rank = self.batch_size // n if self.batch_size % n == 0 else 0
        return [("steps", self.steps >= 1), ("batch_size", self.batch_size >= 1 and per_rank >= 1),
                ("gradient_accumulation_steps", self.gradient_accumulation_steps >= 1
                 and per_rank % self.gradient_accumulation_steps == 0),
                ("learning_rate", self.learning_rate > 0), ("beta", self.beta > 0),
                ("loss_type", self.loss_type in DPO_LOSS_TYPES),
                ("label_smoothing", 0 <= self.label_smoothing < 0.5
                 and (self.loss_type == "sigmoid" or self.label_smoothing == 0)),
                ("rpo_alpha", self.rpo_alpha is None or self.rpo_alpha >= 0),
                ("max_seq_length", self.max_seq_length >= 4),
                ("max_grad_norm", self.max_grad_norm is None or self.max_grad_norm > 0),
                ("weight_decay", self.weight_decay >= 0), ("adam_epsilon", self.adam_epsilon >= 0),
                ("adapter_name", bool(self.adapter_name) and "." not in self.adapter_name),
                ("lora_rank", self.lora_rank >= 1), ("lora_alpha", self.lora_alpha > 0),
                ("lora_targets", bool(self.lora_targets)), ("num_layers", self.num_layers >= 0),
                ("save_every", self.save_every >= 0)]

    def validate(self) -> None:
        check_values(self, self._checks())


class EncodedPair(NamedTuple):
    chosen: list[int]          # prompt + chosen answer + EOS
    chosen_prompt: int         # prompt length in `chosen`
    rejected: list[int]
    rejected_prompt: int


@dataclass
class DPOResult:
    adapter_dir: Path
    steps: int
    loss_first: float
    loss_last: float
    history: list[dict]


def _triple(p: Any, i: int) -> tuple[Any, str, str]:
    if hasattr(p, "chosen") and hasattr(p, "rejected") and hasattr(p, "prompt"):
        return p.prompt, p.chosen, p.rejected
    if isinstance(p, dict):
        try:
            return p["prompt"], p["chosen"], p["rejected"]
        except KeyError as e:
            raise MindprintError(f"preference pair {i}: missing key {e}") from None
    if isinstance(p, (tuple, list)) and len(p) == 3:
        return p[0], p[1], p[2]
    raise MindprintError(f"preference pair {i}: expected (prompt, chosen, rejected), a dict or "
                         f"a PreferenceRecord, got {type(p).__name__}")


def encode_pairs(tokenizer, pairs: Sequence[Any], max_len: int) -> list[EncodedPair]:
    """PreferenceRecords, {prompt, chosen, rejected} dicts or triples -> EncodedPairs."""
    from ..data.batching import encode_pair

    out, cut = [], 0
    for i, p in enumerate(pairs):
        if isinstance(p, EncodedPair):
            out.append(p)
            continue
        prompt, chosen, rejected = _triple(p, i)
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise MindprintError(f"preference pair {i}: chosen and rejected must be strings")
        c, nc, tc = encode_pair(tokenizer, prompt, chosen, max_len)
        r, nr, tr = encode_pair(tokenizer, prompt, rejected, max_len)
        cut += tc or tr
        out.append(EncodedPair(c, nc, r, nr))
    if cut:
        log.warning("%d of %d preference pairs were longer than max_seq_length=%d and were truncated",
                    cut, len(out), max_len)
    return out


@dataclass
class PairBatch:
    """B pairs as 2B teacher-forcing rows: the B chosen rows, then the B rejected ones."""

    tokens: mx.array           # (2B, L)
    prompt_lengths: mx.array   # (2B,)
    response_tokens: mx.array  # (2B, R)
    mask: mx.array             # (2B, R)


def pair_batch(pairs: Sequence[EncodedPair], pad_id: int) -> PairBatch:
    rows = [(p.chosen, p.chosen_prompt) for p in pairs] + [(p.rejected, p.rejected_prompt) for p in pairs]
    for t, n in rows:
        if n < 1 or len(t) <= n:
            raise MindprintError("a preference row has an empty prompt or an empty answer")
    L = max(len(t) for t, _ in rows)
    R = max(len(t) - n for t, n in rows)
    tokens = np.full((len(rows), L), pad_id, dtype=np.int32)
    resp = np.full((len(rows), R), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), R), dtype=np.float32)
    for i, (t, n) in enumerate(rows):
        tokens[i, :len(t)] = t
        resp[i, :len(t) - n] = t[n:]
        mask[i, :len(t) - n] = 1.0
    return PairBatch(mx.array(tokens), mx.array(np.array([n for _, n in rows], dtype=np.int32)),
                     mx.array(resp), mx.array(mask))


def _split(b: PairBatch, idx: np.ndarray) -> PairBatch:
    B = b.tokens.shape[0] // 2
    return pa.take_rows(b, np.concatenate([idx, idx + B]))


class DPOTrainer(pa.PolicyTrainer):
    """One DPO run's state: the adapter, optimizer and step; `train_step(pairs)` is one
    optimizer step on this rank's share of a batch. `train_dpo` drives it."""

    role = "dpo"

    def __init__(self, model: nn.Module, tokenizer, cfg: DPOConfig, frozen_adapters: Sequence[str] = ()):
        super().__init__(model, tokenizer, cfg, frozen_adapters, SALT_INIT)

    # --------------------------------------------------------------- log-probabilities

    def sequence_logps(self, b: PairBatch) -> mx.array:
        """(2B,) sequence log-probs of the rows under the active adapters (IPO: means)."""
        return self._logps(b)[0]

    def _logps(self, b: PairBatch) -> tuple[mx.array, mx.array]:
        """(sequence log-probs (2B,), per-token log-probs (2B, R))."""
        lp, _, _ = response_forward(self.model, b.tokens, b.prompt_lengths, b.response_tokens)
        return sequence_logps(lp, b.mask, average=self.cfg.loss_type == "ipo"), lp

    def reference_logps(self, b: PairBatch) -> mx.array:
        with lora.active_adapters(self.model, self.reference_adapters):
            ref = mx.stop_gradient(self.sequence_logps(b))
            mx.eval(ref)
        return ref

    def _loss(self, model: nn.Module, part: tuple[PairBatch, mx.array]):
        b, ref = part
        cfg = self.cfg
        seq, lp = self._logps(b)
        B = seq.shape[0] // 2
        losses, cr, rr = dpo_loss(seq[:B], seq[B:], ref[:B], ref[B:], cfg.beta, cfg.loss_type,
                                  cfg.label_smoothing)
        sg = mx.stop_gradient
        extra = {}
        if cfg.rpo_alpha is not None:
            nll = rpo_nll(lp[:B], b.mask[:B])
            losses = losses + cfg.rpo_alpha * nll
            extra["nll_loss"] = sg(nll).mean()
        loss = losses.mean()
        stats = {"loss": sg(loss), "rewards/chosen": cr.mean(), "rewards/rejected": rr.mean(),
                 "rewards/accuracies": (cr > rr).astype(mx.float32).mean(),
                 "rewards/margins": (cr - rr).mean(), "logps/chosen": sg(seq[:B]).mean(),
                 "logps/rejected": sg(seq[B:]).mean(), **extra}
        return loss, stats

    def train_step(self, pairs: Sequence[EncodedPair]) -> dict:
        """One optimizer step on these pairs (this rank's share of the step's batch)."""
        cfg = self.cfg
        batch = pair_batch(pairs, self.pad_id)
        ref = self.reference_logps(batch)
        n = len(pairs)
        micro = np.array_split(np.arange(n), min(cfg.gradient_accumulation_steps, n))
        B = n
        parts = [(_split(batch, idx), mx.concatenate([ref[mx.array(idx)], ref[mx.array(idx + B)]]))
                 for idx in micro]
        with lora.active_adapters(self.model, self.policy_adapters), \
                gradient_checkpointing(self.model, cfg.grad_checkpoint):
            grads, stats = pa.accumulate(self._loss_and_grad, self.model, parts,
                                         [len(i) / n for i in micro])
            stats = pa.apply_update(self.model, self.optimizer, grads, stats, cfg.max_grad_norm,
                                    self.role, self.step, weight=n)
        self.step += 1
        return stats

    # --------------------------------------------------------------- checkpoints

    def state(self) -> dict:
        return {"role": self.role, "step": self.step, "seed": self.cfg.seed,
                "config": to_dict(self.cfg)}

    def save(self, ckpt: Path, extra: dict | None = None) -> None:
        pa.checkpoint(ckpt, self.model, self.optimizer, {**self.state(), **(extra or {})})

    def save_final(self, out: Path, steps: int, extra: dict | None = None) -> None:
        save_adapter(self.model, self.cfg.adapter_name, out,
                     metadata={"role": self.role, "stack": self.policy_adapters, "steps": steps,
                               "training_config": to_dict(self.cfg), **(extra or {})})


def train_dpo(model: nn.Module, tokenizer, pairs: Sequence[Any], cfg: DPOConfig,
              out_dir: str | Path, frozen_adapters: Sequence[str] = (), resume: bool = False,
              metrics_path: str | Path | None = None,
              on_step: Callable[[int, dict], None] | None = None) -> DPOResult:
    """Train the `cfg.adapter_name` LoRA adapter with DPO on preference pairs.

    pairs: PreferenceRecords, {"prompt", "chosen", "rejected"} dicts, (prompt, chosen,
    rejected) triples or EncodedPairs; a prompt is chat messages or a string. The
    reference is `frozen_adapters` (e.g. ["sft"]) on the same base. Writes
    out_dir/checkpoint/ (resumable, exactly), out_dir/metrics.jsonl (TRL's names:
    rewards/chosen, rewards/margins, ...) and the adapter to out_dir/dpo_adapter.
    Data parallel (mlx.launch): every rank passes the same pairs and takes every
    size-th pair of each batch; gradients are averaged weighted by pairs.
    """
    if not pairs:
        raise MindprintError("train_dpo: no preference pairs")
    out = Path(out_dir)
    ckpt = out / "checkpoint"
    metrics = Path(metrics_path) if metrics_path else out / "metrics.jsonl"
    saved_active = lora.get_active(model)
    trainer = DPOTrainer(model, tokenizer, cfg, frozen_adapters)
    rank, world, _ = dist.world()
    try:
        encoded = encode_pairs(tokenizer, pairs, cfg.max_seq_length)
        state = pa.restore_or_start(ckpt, metrics, model, trainer.optimizer, resume, "dpo")
        if state is not None:
            trainer.step, trainer.history = int(state["step"]), list(state.get("history", []))
        mx.reset_peak_memory()

        def do_step(step: int) -> dict:
            idx = pa.cycled_indices(len(encoded), step, cfg.batch_size, cfg.seed, SALT_ORDER)
            stats = trainer.train_step([encoded[i] for i in idx[rank::world]])
            return {**stats, **pa.memory_stats("dpo", trainer.base_bytes)}

        pa.run_steps("dpo", cfg.steps, trainer.step, do_step,
                     lambda: trainer.save(ckpt, {"history": trainer.history}), ckpt, metrics,
                     cfg.save_every, cfg.progress, trainer.norm_start,
                     lambda: pa.adapter_norm(model, cfg.adapter_name), trainer.history, on_step,
                     bar_keys=("loss", "rewards/margins", "rewards/accuracies"),
                     hint="lower dpo.learning_rate or raise dpo.beta")
    finally:
        pa.finish(model, cfg.adapter_name, saved_active)
    adapter_dir = out / "dpo_adapter"
    if dist.is_main():
        trainer.save_final(adapter_dir, trainer.step)
    hist = trainer.history
    return DPOResult(adapter_dir, trainer.step, hist[0]["loss"] if hist else float("nan"),
                     hist[-1]["loss"] if hist else float("nan"), hist)
