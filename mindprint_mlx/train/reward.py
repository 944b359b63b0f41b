"""The reward model: the base plus a "reward" LoRA adapter plus a scalar head read at the
last non-padding token, trained on preference pairs with the Bradley-Terry loss
-log sigmoid(r_chosen - r_rejected - margin).

Rows are laid out exactly as SFT lays them out (`data.batching.encode_pair`: chat-templated
prompt, response, EOS), so the head reads the score at the response's EOS, and
`RewardModel.score` sees exactly what training saw. Training runs on `train.loop.TrainingLoop`:
this module gives it the pairs, the loss and the end-of-epoch validation with early stopping.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import distributed as dist
from ..config import to_dict
from ..errors import MindprintError
from ..io import atomic_write_json
from ..models import lora
from ..models.adapters import load_adapter, load_heads, read_adapter_config, save_adapter
from ..models.heads import ScalarHead, hidden_size, hidden_states
from ..data.batching import as_messages, batch_order, encode_pair, pad_id, pad_rows
from .checkpoint import fingerprint
from .loop import (LoopSpec, TrainingLoop, TrainState, early_stopping, gradient_checkpointing,
                   lora_layer_indices, optimizer_for, plan_steps, rank_share, training_only)
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
    val_split: Literal["prompt", "pair"] = field(
        default="prompt", metadata={"help": "prompt: validation pairs' prompts are never trained "
                                            "on (accuracy on new prompts); pair: any pairs"})
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
                            ("val_split", self.val_split in ("prompt", "pair")),
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


def split_pairs(n: int, val_fraction: float, seed: int,
                groups: Sequence[Any] | None = None) -> tuple[list[int], list[int]]:
    """Seeded train/validation split of n items (at least one of each).

    With `groups` (one key per item, e.g. its prompt), whole groups go to one side: the
    groups are permuted and taken into validation until it holds `val_fraction` of the
    items, so no validation prompt is trained on. When every key is distinct this is the
    same split as without groups."""
    if n < 2:
        raise MindprintError(f"reward training needs at least 2 preference pairs, got {n}")
    n_val = min(n - 1, max(1, int(round(val_fraction * n))))
    if groups is None:
        perm = np.random.default_rng(seed).permutation(n).tolist()
        return sorted(perm[n_val:]), sorted(perm[:n_val])
    members: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    keys = list(members)
    if len(keys) < 2:
        raise MindprintError("reward training with val_split: prompt needs pairs on at least 2 "
                             "prompts (or set val_split: pair)")
    val: list[int] = []
    for j, gi in enumerate(np.random.default_rng(seed).permutation(len(keys)).tolist()):
        if len(val) >= n_val or j == len(keys) - 1:   # the last group always trains
            break
        val += members[keys[gi]]
    held = set(val)
    return [i for i in range(n) if i not in held], sorted(val)


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
    summed over ranks, and rank 0 alone writes. A stop request (`mindprint_mlx.stop.request_stop`)
    checkpoints after the current step (mid-epoch) and raises `Interrupted`.
    """
    out = Path(out_dir)
    metrics = Path(metrics_path) if metrics_path else out / "metrics.jsonl"
    items = preference_pairs(pairs, cfg.include_distinctions)
    groups = [repr(p) for p, _, _ in items] if cfg.val_split == "prompt" else None
    train_idx, val_idx = split_pairs(len(items), cfg.val_fraction, cfg.seed, groups)
    rows, n_cut = _encode(tokenizer, items, cfg.max_seq_length)
    train_rows = [rows[i] for i in train_idx]
    val_rows = [rows[i] for i in val_idx]
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
    was_training = model.training
    try:
        with training_only(model, adapter_name), lora.active_adapters(model, [adapter_name]), \
                gradient_checkpointing(model, cfg.grad_checkpoint):
            return _train(net, model, adapter_name, cfg, out, metrics, train_rows, val_rows,
                          pad_id(tokenizer), run_fp, n_cut, resume, progress, on_epoch)
    finally:
        model.train(was_training)
        if adapter_name in lora.adapter_names(model):
            lora.remove_adapter(model, adapter_name)


@dataclass
class RewardState(TrainState):
    best_val_accuracy: float = 0.0    # of the best epoch (`best` holds its val loss)
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)   # one record an epoch


# the loop's metric values under the reward model's names, in the order of a metric line
METRIC_NAMES = {"loss": "reward/train_loss", "acc": "reward/train_accuracy", "lr": "reward/lr",
                "grad_norm": "reward/grad_norm"}


def _train(net, model, adapter_name, cfg, out, metrics, train_rows, val_rows, pid, run_fp, n_cut,
           resume, progress, on_epoch) -> RewardResult:
    """The reward model's data and loss on the training loop: length-sorted batches of
    pairs, this rank's pairs of each, the Bradley-Terry loss weighted by pairs; at each
    epoch's end validation, early stopping and the best epoch's adapter and head."""
    rank, world_size, _ = dist.world()
    lengths = [max(len(c), len(r)) for c, r in train_rows]
    steps_per_epoch = -(-len(train_rows) // cfg.batch_size)
    total_steps = plan_steps(steps_per_epoch, cfg.epochs)[1]
    schedule = cosine_with_warmup(cfg.learning_rate, total_steps, warmup_steps_for(total_steps, cfg.warmup_ratio))
    spec = LoopSpec(role="reward", per_epoch=steps_per_epoch, epochs=cfg.epochs,
                    max_grad_norm=cfg.max_grad_norm, compile=cfg.compile, log_every=cfg.log_every,
                    log_per_epoch=True, save_at_epoch_end=True, aux=("acc",), log_keys=METRIC_NAMES)

    def loss(net, tokens, lengths, weights=None):
        scores = net(tokens, lengths)
        if weights is None:
            value, acc = bradley_terry(scores, cfg.margin)
            return value, mx.array(scores.shape[0] // 2, dtype=mx.float32), acc
        value, acc = weighted_bradley_terry(scores, weights, cfg.margin)
        return value, weights.sum(), acc

    loop = TrainingLoop(net, optimizer_for(cfg, schedule), loss, spec, out / "checkpoint",
                        metrics, run_fp, progress)
    state = loop.start(RewardState(), resume)

    def arrays(pairs_rows):
        rows = [c for c, _ in pairs_rows] + [r for _, r in pairs_rows]
        return pad_rows(rows, pid, pad_to_multiple=8)

    def make_batch(group):
        """This rank's pairs of a batch; fillers (copies with weight 0) even the count."""
        mine, fill = rank_share(group, rank, world_size)
        args = arrays([train_rows[i] for i in mine] + [train_rows[group[0]]] * fill)
        if world_size > 1:
            args = (*args, mx.array([1.0] * len(mine) + [0.0] * fill, dtype=mx.float32))
        return args, sum(lengths[i] for i in group)

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

    meta = {"role": "reward_model", "training_config": to_dict(cfg), "truncated_rows": n_cut}

    def end_epoch(state: RewardState, epoch: int) -> None:
        ep = state.epoch_sums
        val_loss, val_acc = evaluate()
        rec = {"epoch": epoch, "step": state.step,
               "reward/epoch_train_loss": ep.mean(), "reward/epoch_train_accuracy": ep.mean("acc"),
               "reward/val_loss": val_loss, "reward/val_accuracy": val_acc,
               "reward/epoch_seconds": ep.seconds}
        improved, state.bad_epochs, stop = early_stopping(state.best, val_loss, state.bad_epochs,
                                                          cfg.patience, cfg.min_delta)
        if improved:
            state.best, state.best_val_accuracy = val_loss, val_acc
            if dist.is_main():
                save_adapter(model, adapter_name, out / "adapter", heads={HEAD_NAME: net.head},
                             metadata={**meta, "epoch": epoch, "val_loss": val_loss,
                                       "val_accuracy": val_acc})
            rec["reward/best"] = True
        if stop:
            state.stopped_early = state.done = True
            loop.write(f"reward: early stop after epoch {epoch}: val loss did not improve "
                       f"by {cfg.min_delta} for {cfg.patience} epochs (best {state.best:.4f})")
        rec["reward/stopped_early"] = state.stopped_early
        state.history.append(rec)
        loop.log(rec)
        loop.write(f"reward epoch {epoch}: train loss {rec['reward/epoch_train_loss']:.4f} "
                   f"acc {rec['reward/epoch_train_accuracy']:.3f} | val loss {val_loss:.4f} "
                   f"acc {val_acc:.3f}")
        if on_epoch is not None:
            on_epoch(epoch, rec)

    loop.run(state, lambda epoch: batch_order(lengths, cfg.batch_size, seed=cfg.seed + epoch),
             make_batch, on_epoch_end=end_epoch)
    adapter_dir = out / "adapter"
    result = RewardResult(adapter_dir=adapter_dir, best_val_loss=state.best,
                          best_val_accuracy=state.best_val_accuracy,
                          stopped_early=state.stopped_early, epochs=state.micro // steps_per_epoch,
                          history=list(state.history))
    if not dist.is_main():
        return result
    if not (adapter_dir / "adapter_config.json").is_file():
        raise MindprintError(f"reward: no checkpoint was kept in {adapter_dir}")
    atomic_write_json(out / "reward_result.json", {
        "epoch": result.epochs, "best_val_loss": result.best_val_loss,
        "best_val_accuracy": result.best_val_accuracy, "stopped_early": result.stopped_early,
        "history": result.history})
    return result
