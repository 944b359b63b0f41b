"""Supervised fine-tuning with a named LoRA adapter, loss on the completion tokens only.

One obvious path: encode rows (chat template, completion, EOS), hand the training loop
(`train.loop.TrainingLoop`) a seeded, length-sorted batch order per epoch, the completion
loss weighted by its target tokens and the held-out loss as evaluation; the loop takes
the (compiled, accumulated, clipped) AdamW steps on a warmup+cosine schedule, logs,
evaluates and checkpoints. The data order is a pure function of (seed, epoch), so a
checkpoint only needs the position in it to resume exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import mlx.core as mx
import numpy as np
import mlx.nn as nn

from .. import distributed as dist
from ..config import to_dict
from ..errors import MindprintError
from ..io import atomic_write_json
from ..models import lora
from ..models.adapters import save_adapter
from ..data.batching import as_messages, batch_order, encode_records, pad_batch, pad_id
from .checkpoint import fingerprint
from .loop import (LoopSpec, TrainingLoop, TrainState, gradient_checkpointing, lora_layer_indices,
                   epochs_for_min_steps, optimizer_for, rank_share, training_only)
from .schedule import cosine_with_warmup, warmup_steps_for

log = logging.getLogger(__name__)

# the loop's metric values under SFT's names, in the order of a metric line
METRIC_NAMES = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                "tokens_per_sec": "train/tokens_per_sec", "peak_memory_gb": "train/peak_memory_gb"}


@dataclass
class SFTConfig:
    """LoRA SFT. Loss covers the completion and its EOS; the prompt only conditions."""

    seed: int = field(default=0, metadata={"help": "data order, LoRA init, dropout"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_dropout: float = field(
        default=0.0, metadata={"help": "dropout on the LoRA input (0: none)"})
    lora_targets: list[str] = field(
        default_factory=lambda: list(lora.DEFAULT_TARGETS),
        metadata={"help": "linear layers that get LoRA (names inside a decoder layer)"})
    num_layers: int = field(
        default=0, metadata={"help": "LoRA on the last N decoder layers; 0 = all"})
    epochs: int = field(
        default=3,
        metadata={"help": "passes over the records (the pipeline sets it per topic: adaptive)"})
    batch_size: int = field(default=4, metadata={"help": "rows per micro-batch"})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "micro-batches per optimizer step"})
    max_seq_length: int = field(
        default=512, metadata={"help": "tokens per row; longer rows are cut, counted and reported"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate (AdamW)"})
    min_lr_ratio: float = field(
        default=0.0, metadata={"help": "cosine decays to learning_rate * min_lr_ratio"})
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW's decoupled weight decay (0: plain Adam)"})
    adam_bias_correction: bool = field(
        default=True,
        metadata={"help": "bias-corrected Adam, as torch/PEFT recipes assume (mlx: off)"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "Adam's epsilon (torch's default)"})
    warmup_ratio: float = field(
        default=0.05, metadata={"help": "linear warmup over this fraction of optimizer steps"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip by global norm; 0 disables"})
    grad_checkpoint: bool = field(
        default=False, metadata={"help": "recompute layer activations in backward (less memory)"})
    eval_every: int = field(
        default=0,
        metadata={"help": "optimizer steps between eval-loss measurements; 0 = end of each epoch"})
    save_every: int = field(
        default=50,
        metadata={"help": "optimizer steps between checkpoints (and always at the end)"})
    log_every: int = field(default=1, metadata={"help": "optimizer steps between metric lines"})
    max_steps: int = field(
        default=0,
        metadata={"help": "cap on optimizer steps (the schedule spans the cap); 0 = epochs decide"})
    min_steps: int = field(
        default=0,
        metadata={"help": "at least this many optimizer steps: a small dataset gets more epochs "
                          "(0 = epochs decide)"})
    pad_to_multiple: int = field(
        default=8, metadata={"help": "round batch length up (fewer shapes for the compiled step)"})
    compile: bool | None = field(
        default=None,
        metadata={"help": "mx.compile the step; None = on a GPU only (no gain measured on CPU)"})
    replay_fraction: float = field(
        default=0.75,
        metadata={"help": "pipeline: share of a topic's SFT rows replayed from earlier topics"})

    def validate(self) -> None:
        from ..config import check_values

        check_values(self, [("replay_fraction", 0.0 <= self.replay_fraction < 1.0),
                            ("lora_rank", self.lora_rank >= 1),
                            ("lora_dropout", 0.0 <= self.lora_dropout < 1.0),
                            ("num_layers", self.num_layers >= 0),
                            ("lora_targets", bool(self.lora_targets)), ("epochs", self.epochs >= 1),
                            ("batch_size", self.batch_size >= 1),
                            ("gradient_accumulation_steps", self.gradient_accumulation_steps >= 1),
                            ("max_seq_length", self.max_seq_length >= 4), ("learning_rate", self.learning_rate > 0),
                            ("adam_epsilon", self.adam_epsilon >= 0),
                            ("weight_decay", self.weight_decay >= 0),
                            ("warmup_ratio", 0.0 <= self.warmup_ratio < 1.0),
                            ("min_lr_ratio", 0.0 <= self.min_lr_ratio <= 1.0),
                            ("max_grad_norm", self.max_grad_norm >= 0),
                            ("save_every", self.save_every >= 1), ("log_every", self.log_every >= 1),
                            ("eval_every", self.eval_every >= 0), ("max_steps", self.max_steps >= 0),
                            ("min_steps", self.min_steps >= 0),
                            ("pad_to_multiple", self.pad_to_multiple >= 1)])


@dataclass
class SFTRun:
    """What a standalone SFT run reads and writes (`mindprint sft`); the pipeline has its own."""

    model: str = field(default="", metadata={"help": "base model (directory or hub id)"})
    data_dir: str = field(
        default="", metadata={"help": "data directory whose SFT records are trained on"})
    out_dir: str = field(
        default="runs/sft", metadata={"help": "adapter/, checkpoint/, metrics.jsonl go here"})
    eval_fraction: float = field(
        default=0.1, metadata={"help": "held-out share of the records for the eval loss (0: none)"})

    def validate(self) -> None:
        from ..config import ConfigError, check_values

        for key in ("model", "data_dir"):
            if not getattr(self, key):
                raise ConfigError(f"key '{key}' is required (set it in the file or pass {key}=...)")
        check_values(self, [("eval_fraction", 0.0 <= self.eval_fraction < 1.0)])


@dataclass
class SFTResult:
    adapter_dir: Path
    train_loss: float  # mean loss of the last logged window
    eval_loss: float | None  # held-out loss at the end (None without eval records)
    steps: int  # optimizer steps taken in total
    eval_loss_start: float | None = None  # held-out loss before training
    truncated: int = 0  # rows cut to max_seq_length
    history: list[dict] = field(default_factory=list)  # metric lines of this call
    epochs: int = 0  # epochs run: the config's, or more to reach min_steps


def sft_pairs(records: Sequence[Any]) -> list[tuple[list[dict], str]]:
    """(messages, completion) from SFTRecords (or (prompt, completion) tuples)."""
    out = []
    for r in records:
        if hasattr(r, "completion"):
            out.append((as_messages(r.prompt), r.completion))
        elif isinstance(r, (tuple, list)) and len(r) == 2:
            out.append((as_messages(r[0]), str(r[1])))
        else:
            raise MindprintError(f"not an SFT record: {r!r:.80}")
    return out


def token_loss(model: nn.Module, inputs: mx.array, targets: mx.array,
               target_mask: mx.array) -> tuple[mx.array, mx.array]:
    """Mean cross-entropy of `targets` where `target_mask` is 1, and the count of them."""
    logits = model(inputs)
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets) * target_mask
    n = target_mask.sum()
    return ce.sum() / mx.maximum(n, 1.0), n


def completion_loss(model: nn.Module, tokens: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """Next-token loss over the completion+EOS positions of right-padded rows (pad_batch)."""
    return token_loss(model, tokens[:, :-1], tokens[:, 1:], mask[:, 1:])


def eval_loss(model: nn.Module, rows: Sequence[tuple[list[int], int]], batch_size: int, pid: int,
              pad_to_multiple: int = 8, distributed: bool = False) -> float:
    """Token-weighted completion loss over `rows` (dropout off).

    distributed: every rank passes all `rows`, computes its share (`rows[rank::size]`) and
    the totals are summed over ranks (call it on every rank)."""
    if not rows:
        return float("nan")
    was_training = model.training
    model.eval()
    rank, size, _ = dist.world()
    if distributed and size > 1:
        rows = list(rows)[rank::size]
    total, count = mx.array(0.0), mx.array(0.0)
    for group in (batch_order([len(t) for t, _ in rows], batch_size, seed=0, shuffle=False)
                  if rows else []):
        tokens, mask = pad_batch([rows[i][0] for i in group], [rows[i][1] for i in group], pid,
                                 pad_to_multiple)
        loss, n = completion_loss(model, tokens, mask)
        total, count = total + loss * n, count + n
        mx.eval(total, count)
    model.train(was_training)
    if distributed and size > 1:
        total, count = dist.global_sum(mx.stack([total, count]))
    return (total / mx.maximum(count, 1.0)).item()


def train_sft(model: nn.Module, tokenizer, records: Sequence[Any], cfg: SFTConfig,
              out_dir: str | Path, adapter_name: str = "sft", eval_records: Sequence[Any] | None = None,
              resume: bool = False, metrics_path: str | Path | None = None, progress: bool = True,
              on_step: Callable[[int, dict], None] | None = None,
              replay_records: Sequence[Any] = (), replay_per_epoch: int = 0,
              existing: bool = False) -> SFTResult:
    """Train LoRA adapter `adapter_name` on `records`; returns where the adapter went.

    existing: train the adapter `adapter_name` already in the model (its factors, rank and
    scale as they are; no fresh LoRA is applied; which adapters are active is the caller's),
    e.g. to repair an SVD-compressed adapter; on failure it is left in the model.

    Replay (the pipeline's guard against forgetting earlier topics): every epoch also takes
    `replay_per_epoch` rows drawn afresh from `replay_records` (seeded by seed and epoch),
    so over the epochs the whole pool is revisited, not one fixed subset.

    Writes `out_dir/adapter/` (mlx-lm adapter dir), `out_dir/checkpoint/` (resume state)
    and metric lines (`out_dir/metrics.jsonl` unless `metrics_path`). Other adapters in
    the model keep their active state and are frozen while this one trains; afterwards
    the new adapter stays in the model, active and frozen. `on_step(step, metrics)` runs
    after every optimizer step.

    Data parallel (under `mlx.launch`): every rank passes the same records; each computes
    its share of every batch (rows `rank::size`; a rank left short gets a fully masked row,
    so the token weighting stays exact), gradients are averaged weighted by token count,
    and rank 0 alone writes files and shows progress. A stop request
    (`mindprint_mlx.stop.request_stop`, the first Ctrl-C) saves a checkpoint after the
    current optimizer step and raises `Interrupted`; `resume=True` continues exactly.
    """
    out = Path(out_dir)
    metrics = Path(metrics_path) if metrics_path else out / "metrics.jsonl"
    train_rows, n_cut = encode_records(tokenizer, sft_pairs(records), cfg.max_seq_length, "SFT rows")
    n_main = len(train_rows)
    if replay_records and replay_per_epoch > 0:
        rrows, r_cut = encode_records(tokenizer, sft_pairs(replay_records), cfg.max_seq_length, "replay rows")
        train_rows, n_cut = train_rows + rrows, n_cut + r_cut
    n_replay = min(replay_per_epoch, len(train_rows) - n_main)
    eval_rows = encode_records(tokenizer, sft_pairs(eval_records), cfg.max_seq_length,
                               "eval rows")[0] if eval_records else []
    if not train_rows:
        raise MindprintError("SFT needs at least one record")
    run_fp = fingerprint({"cfg": {k: v for k, v in to_dict(cfg).items() if k not in (
        "compile", "log_every", "save_every", "eval_every", "grad_checkpoint")},
        "rows": train_rows, "adapter": adapter_name,
        **({"replay": [n_main, n_replay]} if n_replay else {})})

    mx.random.seed(cfg.seed)
    if existing:
        if adapter_name not in lora.adapter_names(model):
            raise MindprintError(f"SFT: no adapter '{adapter_name}' in the model to train")
    else:
        lora.apply_lora(model, adapter_name, targets=cfg.lora_targets, r=cfg.lora_rank,
                        alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                        layers=lora_layer_indices(model, cfg.num_layers), trainable=True,
                        enabled=True)
    ok, was_training = False, model.training
    try:
        with training_only(model, adapter_name), gradient_checkpointing(model, cfg.grad_checkpoint):
            result = _train(model, adapter_name, cfg, out, metrics, train_rows, n_main, n_replay,
                            eval_rows, pad_id(tokenizer), run_fp, n_cut, resume, progress, on_step)
        ok = True
        return result
    finally:
        model.train(was_training)
        if not ok and not existing and adapter_name in lora.adapter_names(model):
            lora.remove_adapter(model, adapter_name)


@dataclass
class SFTState(TrainState):
    eval_loss_start: float | None = None   # held-out loss before the first step


def _train(model, name, cfg, out, metrics, train_rows, n_main, n_replay, eval_rows, pid, run_fp,
           n_cut, resume, progress, on_step) -> SFTResult:
    """SFT's data and loss on the training loop: epoch_order's batches, this rank's rows of
    each, the completion loss weighted by its target tokens, held-out loss as evaluation."""
    lengths = [len(t) for t, _ in train_rows]
    per_epoch = -(-(n_main + n_replay) // cfg.batch_size)
    epochs = epochs_for_min_steps(per_epoch, cfg.epochs, cfg.gradient_accumulation_steps, cfg.min_steps)
    spec = LoopSpec(role="sft", label=f"sft[{name}]", per_epoch=per_epoch,
                    epochs=epochs, accumulation=cfg.gradient_accumulation_steps,
                    max_steps=cfg.max_steps, max_grad_norm=cfg.max_grad_norm, compile=cfg.compile,
                    log_every=cfg.log_every, eval_every=cfg.eval_every, save_every=cfg.save_every,
                    log_keys=METRIC_NAMES)
    total_steps = spec.totals()[1]
    schedule = cosine_with_warmup(cfg.learning_rate, total_steps, warmup_steps_for(total_steps, cfg.warmup_ratio),
                                  min_lr=cfg.learning_rate * cfg.min_lr_ratio)
    loop = TrainingLoop(model, optimizer_for(cfg, schedule), completion_loss, spec,
                        out / "checkpoint", metrics, run_fp, progress)
    state = loop.start(SFTState(), resume)
    rank, world_size, _ = dist.world()

    def evaluate() -> dict:
        return {"eval/loss": eval_loss(model, eval_rows, cfg.batch_size, pid, cfg.pad_to_multiple,
                                       distributed=True)}

    def make_batch(group):
        # A rank left one row short gets a copy of the batch's first row with no target
        # tokens: zero weight, so the token-weighted average stays exact.
        mine, fill = rank_share(group, rank, world_size)
        first = train_rows[group[0]][0]
        rows = [train_rows[i][0] for i in mine] + [first] * fill
        n_prompt = [train_rows[i][1] for i in mine] + [len(first)] * fill
        return pad_batch(rows, n_prompt, pid, cfg.pad_to_multiple), sum(lengths[i] for i in group)

    model.train()
    if eval_rows and state.eval_loss_start is None:
        state.eval_loss_start = evaluate()["eval/loss"]
        loop.log({"step": state.step, "eval/loss": state.eval_loss_start})
    loop.run(state, lambda epoch: epoch_order(lengths, n_main, n_replay, cfg.batch_size, cfg.seed + epoch),
             make_batch, evaluate=evaluate if eval_rows else None, on_step=on_step)

    final_eval = None
    if eval_rows:
        final_eval = next((h["eval/loss"] for h in reversed(loop.history) if "eval/loss" in h), None)
        if final_eval is None:  # resumed a finished run
            final_eval = evaluate()["eval/loss"]
    train_loss = float(state.train_loss if state.train_loss is not None else float("nan"))
    adapter_dir = out / "adapter"
    result = SFTResult(adapter_dir=adapter_dir, train_loss=train_loss, eval_loss=final_eval,
                       steps=state.step, eval_loss_start=state.eval_loss_start,
                       truncated=n_cut, history=loop.history, epochs=epochs)
    if dist.is_main():
        save_adapter(model, name, adapter_dir, metadata={
            "role": "sft", "training_config": to_dict(cfg), "truncated_rows": n_cut,
            "steps": state.step, "epochs": epochs, "train_loss": train_loss, "eval_loss": final_eval,
            "eval_loss_start": state.eval_loss_start})
        atomic_write_json(out / "sft_result.json", {k: v for k, v in result.__dict__.items()
                                                    if k != "history"})
    return result


def epoch_order(lengths: Sequence[int], n_main: int, n_replay: int, batch_size: int,
                seed: int) -> list[list[int]]:
    """One epoch's batches: every one of the first `n_main` rows plus `n_replay` of the
    rows after them, drawn for this epoch's seed; a pure function of its arguments."""
    idx = list(range(n_main))
    if n_replay:
        pool = np.arange(n_main, len(lengths))
        idx += sorted(np.random.default_rng([seed, 1]).choice(pool, n_replay, replace=False).tolist())
    groups = batch_order([lengths[i] for i in idx], batch_size, seed=seed)
    return [[idx[i] for i in g] for g in groups]
