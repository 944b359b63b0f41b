"""Supervised fine-tuning with a named LoRA adapter, loss on the completion tokens only.

One obvious path: encode rows (chat template, completion, EOS), walk a seeded,
length-sorted batch order epoch by epoch, take a (compiled) step that accumulates
gradients and applies AdamW with a warmup+cosine schedule and global-norm clipping, log,
evaluate, checkpoint. The data order is a pure function of (seed, epoch), so a
checkpoint only needs the position in it to resume exactly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import mlx.core as mx
import numpy as np
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from .. import distributed as dist
from ..config import to_dict
from ..errors import MindprintError
from ..guards import step_problem, tree_norm
from ..io import append_jsonl, atomic_write_json, trim_jsonl
from ..models import lora
from ..models.adapters import save_adapter
from ..progress import Progress
from ..data.batching import as_messages, batch_order, encode_records, pad_batch, pad_id
from .checkpoint import (fingerprint, last_good, read_state_on_main, restore_everywhere,
                         save_checkpoint)
from .loop import (Interrupted, gradient_checkpointing, lora_layer_indices, optimizer_for,
                   stop_now, training_only, use_compile)
from .schedule import cosine_with_warmup, warmup_steps_for

log = logging.getLogger(__name__)

LOSS_WINDOW = 8   # optimizer steps averaged by the loss-divergence check


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
              replay_records: Sequence[Any] = (), replay_per_epoch: int = 0) -> SFTResult:
    """Train LoRA adapter `adapter_name` on `records`; returns where the adapter went.

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
    (`train.loop.request_stop`, the pipeline's first Ctrl-C) saves a checkpoint after the
    current optimizer step and raises `Interrupted`; `resume=True` continues exactly.
    """
    out = Path(out_dir)
    adapter_dir, ckpt_dir = out / "adapter", out / "checkpoint"
    metrics = Path(metrics_path) if metrics_path else out / "metrics.jsonl"
    train_rows, n_cut = encode_records(tokenizer, sft_pairs(records), cfg.max_seq_length, "SFT rows")
    n_main = len(train_rows)
    if replay_records and replay_per_epoch > 0:
        rrows, r_cut = encode_records(tokenizer, sft_pairs(replay_records), cfg.max_seq_length, "replay rows")
        train_rows, n_cut = train_rows + rrows, n_cut + r_cut
    replay = (n_main, min(replay_per_epoch, len(train_rows) - n_main))
    eval_rows = encode_records(tokenizer, sft_pairs(eval_records), cfg.max_seq_length,
                               "eval rows")[0] if eval_records else []
    if not train_rows:
        raise MindprintError("SFT needs at least one record")
    run_fp = fingerprint({"cfg": {k: v for k, v in to_dict(cfg).items() if k not in (
        "compile", "log_every", "save_every", "eval_every", "grad_checkpoint")},
        "rows": train_rows, "adapter": adapter_name,
        **({"replay": list(replay)} if replay[1] else {})})

    mx.random.seed(cfg.seed)
    lora.apply_lora(model, adapter_name, targets=cfg.lora_targets, r=cfg.lora_rank,
                    alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                    layers=lora_layer_indices(model, cfg.num_layers), trainable=True, enabled=True)
    ok, was_training = False, model.training
    try:
        with training_only(model, adapter_name), gradient_checkpointing(model, cfg.grad_checkpoint):
            result = _train(model, adapter_name, cfg, out, adapter_dir, ckpt_dir, metrics,
                            train_rows, eval_rows, pad_id(tokenizer), run_fp, n_cut, resume,
                            progress, on_step, replay)
        ok = True
        return result
    finally:
        model.train(was_training)
        if not ok and adapter_name in lora.adapter_names(model):
            lora.remove_adapter(model, adapter_name)


def _train(model, name, cfg, out, adapter_dir, ckpt_dir, metrics, train_rows, eval_rows, pid,
           run_fp, n_cut, resume, progress, on_step, replay=(None, 0)) -> SFTResult:
    lengths = [len(t) for t, _ in train_rows]
    n_main, n_replay = replay
    n_main = len(train_rows) if n_main is None or not n_replay else n_main
    micro_per_epoch = -(-(n_main + n_replay) // cfg.batch_size)
    total_micro = micro_per_epoch * cfg.epochs
    total_steps = -(-total_micro // cfg.gradient_accumulation_steps)
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
        total_micro = min(total_micro, total_steps * cfg.gradient_accumulation_steps)
    schedule = cosine_with_warmup(cfg.learning_rate, total_steps, warmup_steps_for(total_steps, cfg.warmup_ratio),
                                  min_lr=cfg.learning_rate * cfg.min_lr_ratio)
    opt = optimizer_for(cfg, schedule)
    rank, world_size, _ = dist.world()
    main = rank == 0

    state = {"step": 0, "micro": 0, "eval_loss_start": None,
             "norm_start": tree_norm(model.trainable_parameters())}   # for the divergence check
    saved = read_state_on_main(ckpt_dir, resume)
    if saved is not None:
        if saved.get("run_fingerprint") != run_fp:
            raise MindprintError(f"{ckpt_dir}: the checkpoint was written for other data or "
                                 "settings; delete it or run without --resume")
        state.update(restore_everywhere(ckpt_dir, model, opt))
        log.info("sft: resuming at step %d (micro-batch %d of %d)", state["step"], state["micro"],
                 total_micro)
    else:
        if resume:
            log.info("sft: no checkpoint in %s; starting from the beginning", ckpt_dir)
        opt.init(model.trainable_parameters())
    if main:   # each step once: drop the lines of steps after the checkpoint (replayed now)
        trim_jsonl(metrics, state["step"] if saved is not None else None)

    loss_and_grad = nn.value_and_grad(model, completion_loss)
    clip = cfg.max_grad_norm

    def step(tokens, mask, prev, do_update):
        # Accumulates the gradient of the loss *summed* over target tokens and their count,
        # so that an update applies the gradient of the token-mean loss over every
        # micro-batch of the window (the same as one batch of all its rows).
        (loss, ntok), grad = loss_and_grad(model, tokens, mask)
        if world_size > 1:
            # Weighted by token count: exactly the gradient of the union batch's mean loss.
            grad = dist.average_gradients(grad, weight=ntok)
            tot = dist.all_sum(mx.stack([loss * ntok, ntok]))
            loss, ntok = tot[0] / mx.maximum(tot[1], 1.0), tot[1]
        grad = tree_map(lambda g: g * ntok, grad)
        total = ntok
        if prev is not None:
            grad = tree_map(lambda a, b: a + b, grad, prev[0])
            total = total + prev[1]
        if not do_update:
            return loss, ntok, mx.array(0.0), (grad, total)
        grad = tree_map(lambda g: g / mx.maximum(total, 1.0), grad)
        if clip > 0:
            grad, gnorm = optim.clip_grad_norm(grad, clip)
        else:
            gnorm = mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for g in tree_flatten_values(grad)))
        opt.update(model, grad)
        return loss, ntok, gnorm, None

    if use_compile(cfg.compile):
        cstate = [model.state, opt.state, mx.random.state]
        step = partial(mx.compile, inputs=cstate, outputs=cstate)(step)

    meta = {"role": "sft", "training_config": to_dict(cfg), "truncated_rows": n_cut}
    history: list[dict] = []
    model.train()
    if eval_rows and state["eval_loss_start"] is None:
        state["eval_loss_start"] = eval_loss(model, eval_rows, cfg.batch_size, pid, cfg.pad_to_multiple,
                                             distributed=True)
        rec = {"step": state["step"], "eval/loss": state["eval_loss_start"]}
        if main:
            append_jsonl(metrics, rec)
        history.append(rec)

    def checkpoint():
        if not main:
            return
        save_checkpoint(ckpt_dir, model, opt, {**state, "run_fingerprint": run_fp,
                                               "total_steps": total_steps})

    bar = Progress(total_steps, f"sft[{name}]", enabled=progress and main, initial=state["step"])
    last_train_loss = float("nan")
    win_loss, win_n, win_tokens, win_t0 = 0.0, 0, 0, time.perf_counter()
    grad, in_window, acc_loss = None, 0, []
    order_epoch, order = -1, []
    try:
        while state["micro"] < total_micro:
            epoch, b = divmod(state["micro"], micro_per_epoch)
            if epoch != order_epoch:
                order = epoch_order(lengths, n_main, n_replay, cfg.batch_size, cfg.seed + epoch)
                order_epoch = epoch
            group = order[b]
            rows, n_prompt = _local_rows(train_rows, group, rank, world_size)
            tokens, mask = pad_batch(rows, n_prompt, pid, cfg.pad_to_multiple)
            win_tokens += sum(lengths[i] for i in group)
            state["micro"] += 1
            in_window += 1
            window_end = in_window == cfg.gradient_accumulation_steps or state["micro"] == total_micro
            loss, ntok, gnorm, grad = step(tokens, mask, grad, window_end)
            acc_loss.append((loss, ntok))
            if not window_end:
                mx.eval(loss, grad)
                continue
            mx.eval(acc_loss, gnorm, model.trainable_parameters())
            n_all = sum(n.item() for _, n in acc_loss)
            step_loss = sum(x.item() * n.item() for x, n in acc_loss) / max(n_all, 1.0)
            gn = gnorm.item()
            grad, in_window, acc_loss = None, 0, []
            state["step"] += 1
            # divergence by loss compares means over LOSS_WINDOW steps (batches differ: a
            # replayed batch the frozen adapters already know starts far lower than a new one)
            window = (state.get("loss_window") or [])[-(LOSS_WINDOW - 1):] + [step_loss]
            state["loss_window"] = window
            if len(window) == LOSS_WINDOW and state.get("loss_start") is None:
                state["loss_start"] = sum(window) / LOSS_WINDOW
            problem = step_problem(sum(window) / len(window), gn, model.trainable_parameters(),
                                   state.get("loss_start"), state.get("norm_start"))
            if problem:
                raise problem[0](
                    f"sft: {problem[1]} at step {state['step']} (epoch {epoch + 1}, batch {b + 1}; "
                    f"loss {step_loss:.4g}, grad norm {gn:.4g}); {last_good(ckpt_dir)}; lower learning_rate "
                    "or check the data")
            lr = float(schedule(state["step"] - 1).item())
            win_loss += step_loss
            win_n += 1
            bar.update(1, loss=step_loss, lr=lr)
            rec = None
            if state["step"] % cfg.log_every == 0 or state["micro"] == total_micro:
                dt = max(time.perf_counter() - win_t0, 1e-9)
                last_train_loss = state["train_loss"] = win_loss / win_n
                rec = {"step": state["step"], "epoch": epoch + 1, "train/loss": last_train_loss,
                       "train/lr": lr, "train/grad_norm": gn, "train/tokens_per_sec": win_tokens / dt,
                       "train/peak_memory_gb": mx.get_peak_memory() / 1e9}
                bar.set_stats({"tok/s": round(win_tokens / dt)})
                win_loss, win_n, win_tokens, win_t0 = 0.0, 0, 0, time.perf_counter()
            # An accumulation window may cross an epoch's end: evaluate after the window.
            epochs_done = state["micro"] // micro_per_epoch
            epoch_end = epochs_done > state.get("epochs_evaluated", 0)
            if eval_rows and ((cfg.eval_every and state["step"] % cfg.eval_every == 0)
                              or (not cfg.eval_every and epoch_end) or state["micro"] == total_micro):
                tic = time.perf_counter()
                rec = rec or {"step": state["step"], "epoch": epoch + 1}
                rec["eval/loss"] = eval_loss(model, eval_rows, cfg.batch_size, pid, cfg.pad_to_multiple,
                                             distributed=True)
                bar.write(f"sft[{name}] step {state['step']}: eval loss {rec['eval/loss']:.4f}")
                win_t0 += time.perf_counter() - tic  # tokens/s counts training time only
            state["epochs_evaluated"] = epochs_done
            if rec is not None:
                if main:
                    append_jsonl(metrics, rec)
                history.append(rec)
            saved_now = state["step"] % cfg.save_every == 0 or state["micro"] == total_micro
            if saved_now:
                checkpoint()
            if on_step is not None:
                on_step(state["step"], rec or {"step": state["step"], "train/loss": step_loss})
            if state["micro"] < total_micro and stop_now():
                if not saved_now:
                    checkpoint()
                bar.write(f"sft[{name}]: stopped at step {state['step']}; checkpoint in {ckpt_dir}")
                raise Interrupted(f"sft[{name}]", state["step"], ckpt_dir)
    finally:
        bar.close()

    final_eval = None
    if eval_rows:
        final_eval = next((h["eval/loss"] for h in reversed(history) if "eval/loss" in h), None)
        if final_eval is None:  # resumed a finished run
            final_eval = eval_loss(model, eval_rows, cfg.batch_size, pid, cfg.pad_to_multiple,
                                   distributed=True)
    train_loss = float(state.get("train_loss", float("nan")))
    result = SFTResult(adapter_dir=adapter_dir, train_loss=train_loss, eval_loss=final_eval,
                       steps=state["step"], eval_loss_start=state["eval_loss_start"],
                       truncated=n_cut, history=history)
    if main:
        save_adapter(model, name, adapter_dir, metadata={
            **meta, "steps": state["step"], "train_loss": train_loss, "eval_loss": final_eval,
            "eval_loss_start": state["eval_loss_start"]})
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


def _local_rows(train_rows, group: Sequence[int], rank: int, size: int) -> tuple[list, list]:
    """This rank's rows of a batch (`group[rank::size]`) and their prompt lengths. A rank
    left one row short (batch not divisible by the number of ranks) gets a copy of the
    batch's first row with no target tokens: zero loss weight, so the token-weighted
    average stays exact, and every rank runs the same collectives."""
    if size == 1:
        mine = list(group)
        return [train_rows[i][0] for i in mine], [train_rows[i][1] for i in mine]
    mine = list(group)[rank::size]
    rows = [train_rows[i][0] for i in mine]
    n_prompt = [train_rows[i][1] for i in mine]
    per = -(-len(group) // size)
    while len(rows) < per:
        rows.append(train_rows[group[0]][0])
        n_prompt.append(len(train_rows[group[0]][0]))
    return rows, n_prompt


def tree_flatten_values(tree) -> list[mx.array]:
    from mlx.utils import tree_flatten

    return [v for _, v in tree_flatten(tree)]
