"""The reward model: the base plus a "reward" LoRA adapter plus a scalar head read at the
last non-padding token, trained on preference pairs with the Bradley-Terry loss
-log sigmoid(r_chosen - r_rejected - margin).

Rows are laid out exactly as SFT lays them out (`data.batching.encode_pair`: chat-templated
prompt, response, EOS), so the head reads the score at the response's EOS, and
`RewardModel.score` sees exactly what training saw.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from .. import distributed as dist
from ..config import to_dict
from ..errors import MindprintError
from ..guards import DivergedError, divergence, step_problem, tree_norm
from ..io import append_jsonl, atomic_write_json, trim_jsonl
from ..models import lora
from ..models.adapters import load_adapter, load_heads, read_adapter_config, save_adapter
from ..models.heads import ScalarHead, hidden_size, hidden_states
from ..progress import Progress
from ..data.batching import as_messages, batch_order, encode_pair, pad_id, pad_rows
from .checkpoint import fingerprint, last_good, read_state_on_main, restore_everywhere, save_checkpoint
from .loop import (Interrupted, gradient_checkpointing, lora_layer_indices, optimizer_for,
                   stop_now, training_only, use_compile)
from .schedule import cosine_with_warmup, warmup_steps_for

log = logging.getLogger(__name__)

HEAD_NAME = "reward"


@dataclass
class RewardConfig:
    """Reward-model training. LoRA on the base plus a scalar head, Bradley-Terry loss."""

    seed: int = field(default=0, metadata={"help": "split, data order, LoRA init and head init"})
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
        default=10, metadata={"help": "upper bound; early stopping usually ends sooner"})
    batch_size: int = field(default=4, metadata={"help": "preference pairs per step (2x rows)"})
    max_seq_length: int = field(
        default=512,
        metadata={"help": "tokens per row (prompt + response + EOS); longer rows are cut"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW's decoupled weight decay (0: plain Adam)"})
    adam_bias_correction: bool = field(
        default=True,
        metadata={"help": "bias-corrected Adam as torch/TRL assume (mlx's default is off)"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "Adam's epsilon (torch's default)"})
    warmup_ratio: float = field(
        default=0.1,
        metadata={"help": "linear warmup over this fraction of all steps, then cosine decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip gradients by global norm"})
    margin: float = field(default=0.0, metadata={"help": "loss -log sigmoid(r_c - r_r - margin)"})
    val_fraction: float = field(
        default=0.2, metadata={"help": "seeded held-out share of the pairs"})
    patience: int = field(
        default=3,
        metadata={"help": "epochs without a val-loss gain of min_delta before stopping"})
    min_delta: float = field(
        default=0.01,
        metadata={"help": "smallest val-loss improvement that counts (early stopping)"})
    log_every: int = field(default=5, metadata={"help": "batches between metric lines"})
    include_distinctions: bool = field(
        default=False,
        metadata={"help": "add critical distinctions (correct > incorrect) as pairs"})
    compile: bool | None = field(
        default=None,
        metadata={"help": "mx.compile the step; None = on a GPU only (no gain measured on CPU)"})
    grad_checkpoint: bool = field(
        default=False, metadata={"help": "recompute layer activations in backward (less memory)"})

    def validate(self) -> None:
        from ..config import check_values

        check_values(self, [("lora_rank", self.lora_rank >= 1),
                            ("lora_dropout", 0.0 <= self.lora_dropout < 1.0),
                            ("num_layers", self.num_layers >= 0),
                            ("lora_targets", bool(self.lora_targets)), ("epochs", self.epochs >= 1),
                            ("batch_size", self.batch_size >= 1), ("max_seq_length", self.max_seq_length >= 4),
                            ("learning_rate", self.learning_rate > 0), ("adam_epsilon", self.adam_epsilon >= 0),
                            ("weight_decay", self.weight_decay >= 0), ("val_fraction", 0.0 < self.val_fraction < 1.0),
                            ("patience", self.patience >= 1), ("min_delta", self.min_delta >= 0),
                            ("warmup_ratio", 0.0 <= self.warmup_ratio < 1.0),
                            ("max_grad_norm", self.max_grad_norm > 0), ("log_every", self.log_every >= 1)])


@dataclass
class RewardRun:
    """What a standalone reward-model run reads and writes (`mindprint reward train`)."""

    model: str = field(default="", metadata={"help": "base model (directory or hub id)"})
    data_dir: str = field(
        default="", metadata={"help": "data directory whose preference pairs are trained on"})
    out_dir: str = field(
        default="runs/reward", metadata={"help": "adapter/, checkpoint/, metrics.jsonl go here"})

    def validate(self) -> None:
        from ..config import ConfigError

        for key in ("model", "data_dir"):
            if not getattr(self, key):
                raise ConfigError(f"key '{key}' is required (set it in the file or pass {key}=...)")


@dataclass
class RewardResult:
    adapter_dir: Path
    best_val_loss: float
    best_val_accuracy: float
    stopped_early: bool
    epochs: int  # epochs run
    history: list[dict] = field(default_factory=list)  # per epoch: train/val loss and accuracy


# ------------------------------------------------------------------ scoring


def _last_hidden(model: nn.Module, tokens: mx.array, lengths: mx.array) -> mx.array:
    h = hidden_states(model, tokens)  # (B, T, H)
    idx = mx.maximum(lengths.astype(mx.int32) - 1, 0)
    return mx.take_along_axis(h, idx[:, None, None], axis=1)[:, 0, :]


class _RewardNet(nn.Module):
    """Base (with its LoRA adapters) and the head, one module for value_and_grad."""

    def __init__(self, model: nn.Module, head: ScalarHead):
        super().__init__()
        self.base = model
        self.head = head

    def __call__(self, tokens: mx.array, lengths: mx.array) -> mx.array:
        return self.head(_last_hidden(self.base, tokens, lengths))


class RewardModel:
    """Scores responses with base + reward adapter + head, on the shared base model."""

    def __init__(self, model: nn.Module, tokenizer, adapter: str = "reward",
                 head: ScalarHead | None = None, max_len: int = 2048):
        if adapter not in lora.adapter_names(model):
            raise MindprintError(f"the model has no adapter named '{adapter}' "
                                 f"(it has: {', '.join(lora.adapter_names(model)) or 'none'})")
        if head is None:
            raise MindprintError("RewardModel needs its ScalarHead (see RewardModel.load)")
        self.model, self.tokenizer, self.adapter, self.head = model, tokenizer, adapter, head
        self.max_len = max_len
        # adapters active under the reward adapter while scoring (the pipeline's `unfold`,
        # which undoes a base that later training folded units into)
        self.under: list[str] = []

    @classmethod
    def load(cls, model: nn.Module, tokenizer, adapter_dir: str | Path, name: str = "reward",
             max_len: int | None = None) -> "RewardModel":
        """Load a trained reward model into the SHARED `model` as adapter `name` (frozen,
        disabled until scoring). `adapter_dir` is the adapter directory or the training
        out_dir that holds it in `adapter/`."""
        d = Path(adapter_dir)
        if not (d / "adapter_config.json").is_file() and (d / "adapter" / "adapter_config.json").is_file():
            d = d / "adapter"
        _, meta = read_adapter_config(d)
        heads = load_heads(d)
        if HEAD_NAME not in heads:
            raise MindprintError(f"{d}: no reward head (heads.safetensors with head '{HEAD_NAME}'); "
                                 "is this a reward-model directory?")
        if name in lora.adapter_names(model):
            log.info("replacing the model's adapter '%s' with %s", name, d)
            lora.remove_adapter(model, name)
        load_adapter(model, d, name=name, trainable=False, enabled=False)
        head = heads[HEAD_NAME]
        if head.summary.weight.shape[-1] != hidden_size(model):
            raise MindprintError(f"{d}: reward head is {head.summary.weight.shape[-1]} wide, the "
                                 f"model's hidden size is {hidden_size(model)}")
        max_len = max_len or int((meta.get("training_config") or {}).get("max_seq_length", 2048))
        return cls(model, tokenizer, adapter=name, head=head, max_len=max_len)

    def score_tokens(self, tokens: mx.array, lengths: mx.array) -> mx.array:
        """Scores (B,) of right-padded rows `tokens` (B, T), read at position lengths-1.

        Only the reward adapter (and `under`) is active during the call; the previous active set
        comes back afterwards. Adapter dropout is off while scoring.
        """
        tokens = mx.array(tokens).astype(mx.int32)
        lengths = mx.array(lengths).astype(mx.int32)
        adapters = [m.adapters[self.adapter] for _, m in lora.lora_layers(self.model)
                    if self.adapter in m.adapters]
        modes = [a.training for a in adapters]
        for a in adapters:
            a.eval()
        try:
            with lora.active_adapters(self.model, [*self.under, self.adapter]):
                scores = mx.stop_gradient(self.head(_last_hidden(self.model, tokens, lengths)))
                mx.eval(scores)
        finally:
            for a, m in zip(adapters, modes):
                a.train(m)
        return scores

    def score_batch(self, prompts: Sequence[Any], responses: Sequence[str],
                    batch_size: int = 8) -> list[float]:
        """Scores of (prompt, response) pairs; a prompt is a string or chat messages."""
        return score_pairs(self.score_tokens, self.tokenizer, prompts, responses, self.max_len,
                           batch_size)

    def score(self, prompt: Any, response: str) -> float:
        return self.score_batch([prompt], [response])[0]


def score_pairs(score_tokens, tokenizer, prompts: Sequence[Any], responses: Sequence[str],
                max_len: int, batch_size: int = 8) -> list[float]:
    """Scores of (prompt, response) pairs by `score_tokens(tokens, lengths)`, each row laid
    out as reward training lays it out (`data.batching.encode_pair`, cut to `max_len`, padded
    with the pad id); a prompt is a string or chat messages."""
    if len(prompts) != len(responses):
        raise MindprintError(f"reward scores: {len(prompts)} prompts but {len(responses)} responses")
    pid = pad_id(tokenizer)
    out: list[float] = []
    for i in range(0, len(prompts), batch_size):
        rows = [encode_pair(tokenizer, p, r, max_len)[0]
                for p, r in zip(prompts[i:i + batch_size], responses[i:i + batch_size])]
        scores = score_tokens(*pad_rows(rows, pid))
        mx.eval(scores)
        out.extend(float(x) for x in scores.tolist())
    return out


# ------------------------------------------------------------------ training


def preference_pairs(records: Sequence[Any], include_distinctions: bool = True) -> list[tuple]:
    """(prompt messages, chosen, rejected) from PreferenceRecords (and DistinctionRecords,
    correct > incorrect, when `include_distinctions`)."""
    out = []
    for r in records:
        if hasattr(r, "chosen"):
            out.append((as_messages(r.prompt), r.chosen, r.rejected))
        elif hasattr(r, "correct"):
            if include_distinctions:
                out.append((as_messages(r.prompt), r.correct, r.incorrect))
        else:
            raise MindprintError(f"not a preference pair: {r!r:.80}")
    return out


def split_pairs(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded train/validation split of n items (at least one of each)."""
    if n < 2:
        raise MindprintError(f"reward training needs at least 2 preference pairs, got {n}")
    perm = np.random.default_rng(seed).permutation(n).tolist()
    n_val = min(n - 1, max(1, int(round(val_fraction * n))))
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def bradley_terry(scores: mx.array, margin: float) -> tuple[mx.array, mx.array]:
    """scores (2B,) = [chosen; rejected] -> (mean loss, accuracy)."""
    b = scores.shape[0] // 2
    diff = scores[:b] - scores[b:]
    loss = -nn.log_sigmoid(diff - margin).mean()
    acc = (diff > 0).astype(mx.float32).mean()
    return loss, acc


def weighted_bradley_terry(scores: mx.array, weights: mx.array,
                           margin: float) -> tuple[mx.array, mx.array]:
    """`bradley_terry` with a weight per pair (0 drops a padding pair): weighted means."""
    b = scores.shape[0] // 2
    diff = scores[:b] - scores[b:]
    n = mx.maximum(weights.sum(), 1.0)
    loss = -(nn.log_sigmoid(diff - margin) * weights).sum() / n
    acc = ((diff > 0).astype(mx.float32) * weights).sum() / n
    return loss, acc


def _encode(tokenizer, pairs, max_len):
    rows, n_cut = [], 0
    for prompt, chosen, rejected in pairs:
        c, _, cut_c = encode_pair(tokenizer, prompt, chosen, max_len)
        r, _, cut_r = encode_pair(tokenizer, prompt, rejected, max_len)
        rows.append((c, r))
        n_cut += cut_c + cut_r
    if n_cut:
        log.warning("reward: %d of %d rows were longer than max_seq_length=%d tokens and were "
                    "truncated (raise max_seq_length to keep them whole)", n_cut, 2 * len(rows), max_len)
    return rows, n_cut


def train_reward_model(model: nn.Module, tokenizer, pairs: Sequence[Any], cfg: RewardConfig,
                       out_dir: str | Path, resume: bool = False, adapter_name: str = "reward",
                       metrics_path: str | Path | None = None, progress: bool = True,
                       on_epoch=None) -> RewardResult:
    """Train base + LoRA `adapter_name` + scalar head on preference `pairs`.

    Writes `out_dir/adapter/` (the best epoch's mlx-lm adapter dir with heads.safetensors,
    head "reward"), `out_dir/checkpoint/` (resume state, per epoch) and metrics lines.
    The adapter is removed from `model` afterwards (load it with `RewardModel.load`).

    Data parallel (under `mlx.launch`): each rank scores its share of every batch of pairs
    (`rank::size`), gradients are averaged weighted by pair count, validation metrics are
    summed over ranks, and rank 0 alone writes. A stop request (`train.loop.request_stop`)
    checkpoints after the current step (mid-epoch) and raises `Interrupted`.
    """
    out = Path(out_dir)
    adapter_dir, ckpt_dir = out / "adapter", out / "checkpoint"
    metrics = Path(metrics_path) if metrics_path else out / "metrics.jsonl"
    items = preference_pairs(pairs, cfg.include_distinctions)
    train_idx, val_idx = split_pairs(len(items), cfg.val_fraction, cfg.seed)
    rows, n_cut = _encode(tokenizer, items, cfg.max_seq_length)
    pid = pad_id(tokenizer)
    train_rows = [rows[i] for i in train_idx]
    val_rows = [rows[i] for i in val_idx]
    lengths = [max(len(c), len(r)) for c, r in train_rows]
    steps_per_epoch = -(-len(train_rows) // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    run_fp = fingerprint({"cfg": {k: v for k, v in to_dict(cfg).items()
                                  if k not in ("epochs", "patience", "min_delta", "log_every",
                                               "compile", "grad_checkpoint")},
                          "rows": rows})

    mx.random.seed(cfg.seed)
    lora.apply_lora(model, adapter_name, targets=cfg.lora_targets, r=cfg.lora_rank,
                    alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                    layers=lora_layer_indices(model, cfg.num_layers), trainable=True, enabled=False)
    head = ScalarHead(hidden_size(model), zero_init=False, bias=False)  # BT cannot train a bias
    net = _RewardNet(model, head)
    schedule = cosine_with_warmup(cfg.learning_rate, total_steps, warmup_steps_for(total_steps, cfg.warmup_ratio))
    opt = optimizer_for(cfg, schedule)
    was_training = model.training
    try:
        with training_only(model, adapter_name), lora.active_adapters(model, [adapter_name]), \
                gradient_checkpointing(model, cfg.grad_checkpoint):
            return _train(net, model, adapter_name, opt, cfg, out, adapter_dir, ckpt_dir, metrics,
                          train_rows, val_rows, lengths, pid, steps_per_epoch, total_steps,
                          run_fp, n_cut, resume, progress, on_epoch)
    finally:
        model.train(was_training)
        if adapter_name in lora.adapter_names(model):
            lora.remove_adapter(model, adapter_name)


def _train(net, model, adapter_name, opt, cfg, out, adapter_dir, ckpt_dir, metrics, train_rows,
           val_rows, lengths, pid, steps_per_epoch, total_steps, run_fp, n_cut, resume,
           progress, on_epoch) -> RewardResult:
    rank, world_size, _ = dist.world()
    main = rank == 0
    # "batch" and the accumulators: the position inside an epoch (a stop request
    # checkpoints mid-epoch; epoch-end checkpoints have batch 0).
    state = {"epoch": 0, "step": 0, "best_val_loss": float("inf"), "best_val_accuracy": 0.0,
             "bad_epochs": 0, "stopped_early": False, "done": False, "history": [],
             "batch": 0, "acc": [0.0, 0.0, 0.0, 0.0, 0, 0.0],
             "norm_start": tree_norm(net.trainable_parameters())}   # for the divergence check
    saved = read_state_on_main(ckpt_dir, resume)
    if saved is not None:
        if saved.get("run_fingerprint") != run_fp:
            raise MindprintError(f"{ckpt_dir}: the checkpoint was written for other data or "
                                 "settings; delete it or run without resume")
        state.update(restore_everywhere(ckpt_dir, net, opt))
        log.info("reward: resuming after epoch %d", state["epoch"])
    else:
        opt.init(net.trainable_parameters())
        if not resume and ckpt_dir.exists():
            log.info("reward: starting fresh (resume=False); %s will be overwritten", ckpt_dir)
    if main:   # each step once: drop the lines of steps after the checkpoint (replayed now)
        trim_jsonl(metrics, state["step"] if saved is not None else None)

    def loss_fn(net, tokens, lengths, weights=None):
        if weights is None:
            return bradley_terry(net(tokens, lengths), cfg.margin)
        return weighted_bradley_terry(net(tokens, lengths), weights, cfg.margin)

    value_and_grad = nn.value_and_grad(net, loss_fn)

    def step(tokens, lengths, weights=None):
        (loss, acc), grads = value_and_grad(net, tokens, lengths, weights)
        if world_size > 1:
            n = weights.sum()
            grads = dist.average_gradients(grads, weight=n)
            tot = dist.all_sum(mx.stack([loss * n, acc * n, n]))
            loss, acc = tot[0] / mx.maximum(tot[2], 1.0), tot[1] / mx.maximum(tot[2], 1.0)
        grads, gnorm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
        opt.update(net, grads)
        return loss, acc, gnorm

    if use_compile(cfg.compile):
        cstate = [net.state, opt.state, mx.random.state]
        step = partial(mx.compile, inputs=cstate, outputs=cstate)(step)

    def arrays(pairs_rows):
        rows = [c for c, _ in pairs_rows] + [r for _, r in pairs_rows]
        return pad_rows(rows, pid, pad_to_multiple=8)

    def local_pairs(group):
        """This rank's pairs of a batch, padded with zero-weight copies to equal counts."""
        if world_size == 1:
            return arrays([train_rows[i] for i in group])
        mine = [train_rows[i] for i in list(group)[rank::world_size]]
        per = -(-len(group) // world_size)
        w = [1.0] * len(mine) + [0.0] * (per - len(mine))
        mine += [train_rows[group[0]]] * (per - len(mine))
        return (*arrays(mine), mx.array(w, dtype=mx.float32))

    def evaluate() -> tuple[float, float]:
        net.eval()
        tot_loss = tot_acc = 0.0
        mine = val_rows[rank::world_size] if world_size > 1 else val_rows
        for i in range(0, len(mine), cfg.batch_size):
            chunk = mine[i:i + cfg.batch_size]
            loss, acc = bradley_terry(net(*arrays(chunk)), cfg.margin)
            mx.eval(loss, acc)
            tot_loss += loss.item() * len(chunk)
            tot_acc += acc.item() * len(chunk)
        net.train()
        if world_size > 1:
            tot_loss, tot_acc = dist.global_sum(mx.array([tot_loss, tot_acc])).tolist()
        return tot_loss / len(val_rows), tot_acc / len(val_rows)

    def checkpoint():
        if main:
            save_checkpoint(ckpt_dir, net, opt, {**state, "run_fingerprint": run_fp})

    bar = Progress(total_steps, "reward", enabled=progress and main, initial=state["step"])
    meta = {"role": "reward_model", "training_config": to_dict(cfg), "truncated_rows": n_cut}
    net.train()
    try:
        while not state["done"] and state["epoch"] < cfg.epochs:
            epoch = state["epoch"]
            order = batch_order(lengths, cfg.batch_size, seed=cfg.seed + epoch)
            ep_loss, ep_acc, win_loss, win_acc, win_n, elapsed = state["acc"]
            tic = time.perf_counter() - elapsed
            for b, group in enumerate(order):
                if b < state["batch"]:
                    continue                        # done before a stop request
                loss, acc, gnorm = step(*local_pairs(group))
                mx.eval(loss, acc, gnorm)
                lv, av = loss.item(), acc.item()
                state["step"] += 1
                state.setdefault("loss_start", lv)
                problem = step_problem(lv, gnorm.item(), net.trainable_parameters(),
                                       None, state.get("norm_start"))
                if problem:
                    raise problem[0](
                        f"reward: {problem[1]} at step {state['step']} (epoch {epoch + 1}, batch "
                        f"{b + 1}; loss {lv:.4g}); {last_good(ckpt_dir)}; lower learning_rate or check the data")
                ep_loss += lv * len(group)
                ep_acc += av * len(group)
                win_loss += lv
                win_acc += av
                win_n += 1
                bar.update(1, loss=lv, acc=av, lr=float(opt.learning_rate.item()))
                if ((b + 1) % cfg.log_every == 0 or b + 1 == len(order)) and main:
                    append_jsonl(metrics, {"step": state["step"], "epoch": epoch + 1,
                                           "reward/train_loss": win_loss / win_n,
                                           "reward/train_accuracy": win_acc / win_n,
                                           "reward/lr": float(opt.learning_rate.item()),
                                           "reward/grad_norm": gnorm.item()})
                if (b + 1) % cfg.log_every == 0 or b + 1 == len(order):
                    win_loss = win_acc = 0.0
                    win_n = 0
                if b + 1 < len(order) and stop_now():
                    state["batch"] = b + 1
                    state["acc"] = [ep_loss, ep_acc, win_loss, win_acc, win_n,
                                    time.perf_counter() - tic]
                    checkpoint()
                    bar.write(f"reward: stopped at step {state['step']}; checkpoint in {ckpt_dir}")
                    raise Interrupted("reward", state["step"], ckpt_dir)
            state["batch"], state["acc"] = 0, [0.0, 0.0, 0.0, 0.0, 0, 0.0]
            why = divergence(state["loss_start"], ep_loss / len(train_rows), None, None)
            if why:   # per epoch: single batches of a few pairs are too noisy to judge
                raise DivergedError(f"reward: training diverged in epoch {epoch + 1} ({why}); "
                                    f"{last_good(ckpt_dir)}; lower learning_rate or check the data")
            val_loss, val_acc = evaluate()
            rec = {"epoch": epoch + 1, "step": state["step"],
                   "reward/epoch_train_loss": ep_loss / len(train_rows),
                   "reward/epoch_train_accuracy": ep_acc / len(train_rows),
                   "reward/val_loss": val_loss, "reward/val_accuracy": val_acc,
                   "reward/epoch_seconds": time.perf_counter() - tic}
            if val_loss < state["best_val_loss"] - cfg.min_delta:
                state["best_val_loss"], state["best_val_accuracy"] = val_loss, val_acc
                state["bad_epochs"] = 0
                if main:
                    save_adapter(model, adapter_name, adapter_dir, heads={HEAD_NAME: net.head},
                                 metadata={**meta, "epoch": epoch + 1, "val_loss": val_loss,
                                           "val_accuracy": val_acc})
                rec["reward/best"] = True
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch + 1
            if state["bad_epochs"] >= cfg.patience:
                state["stopped_early"] = True
                state["done"] = True
                bar.write(f"reward: early stop after epoch {epoch + 1}: val loss did not improve "
                          f"by {cfg.min_delta} for {cfg.patience} epochs "
                          f"(best {state['best_val_loss']:.4f})")
            rec["reward/stopped_early"] = state["stopped_early"]
            state["history"].append(rec)
            if main:
                append_jsonl(metrics, rec)
            bar.write(f"reward epoch {epoch + 1}: train loss {rec['reward/epoch_train_loss']:.4f} "
                      f"acc {rec['reward/epoch_train_accuracy']:.3f} | val loss {val_loss:.4f} "
                      f"acc {val_acc:.3f}")
            checkpoint()
            if on_epoch is not None:
                on_epoch(epoch + 1, rec)
            if not state["done"] and state["epoch"] < cfg.epochs and stop_now():
                bar.write(f"reward: stopped after epoch {epoch + 1}; checkpoint in {ckpt_dir}")
                raise Interrupted("reward", state["step"], ckpt_dir)
    finally:
        bar.close()
    if not main:
        return RewardResult(adapter_dir=adapter_dir, best_val_loss=state["best_val_loss"],
                            best_val_accuracy=state["best_val_accuracy"],
                            stopped_early=state["stopped_early"], epochs=state["epoch"],
                            history=list(state["history"]))
    if not (adapter_dir / "adapter_config.json").is_file():
        raise MindprintError(f"reward: no checkpoint was kept in {adapter_dir}")
    atomic_write_json(out / "reward_result.json", {k: state[k] for k in (
        "epoch", "best_val_loss", "best_val_accuracy", "stopped_early", "history")})
    return RewardResult(adapter_dir=adapter_dir, best_val_loss=state["best_val_loss"],
                        best_val_accuracy=state["best_val_accuracy"],
                        stopped_early=state["stopped_early"], epochs=state["epoch"],
                        history=list(state["history"]))
