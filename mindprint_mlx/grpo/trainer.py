"""GRPO and RLOO on one base in memory: k samples per prompt scored by a reward function,
critic-free advantages from each prompt's group, clipped ratio updates of one trainable
LoRA adapter over the frozen reference adapters. No value head, no critic pass.

method=grpo (Shao et al. 2024; TRL's GRPOTrainer): group-normalised advantages
(`scale_rewards=False`: Dr. GRPO), and beta * k3 KL to the reference inside the loss.
method=rloo (Ahmadian et al. 2024; TRL's RLOOTrainer): the KL is a penalty on the
score, score - beta * sum_t (logp_t - ref_t) over the response (from the rollout's
log-probs), and the advantage is that minus the mean of the other k - 1 of its group.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import distributed as dist
from ..config import check_values, to_dict
from ..errors import MindprintError
from ..guards import NonFiniteError, first_nonfinite
from ..models import lora
from ..models.adapters import save_adapter
from ..ppo.rollout import (OLD_LOGPROBS, Generation, batched_response_forward, generate_batch,
                           keep_sampler_logprobs, response_forward)
from ..train import policy_adapter as pa
from ..train.loop import gradient_checkpointing
from .advantages import group_advantages, group_std_is_zero, rloo_advantages
from .losses import GRPO_LOSS_TYPES, grpo_loss, loss_denominator

log = logging.getLogger(__name__)

RewardFn = Callable[[mx.array, mx.array], Any]
SALT_INIT, SALT_ORDER, SALT_KEY = 61, 67, 71


@dataclass
class GRPOConfig:
    """GRPO / RLOO hyperparameters (defaults: TRL's GRPO, with a LoRA-sized learning rate)."""

    method: Literal["grpo", "rloo"] = field(
        default="grpo",
        metadata={"help": "grpo (group-normalised advantages) or rloo (leave-one-out baseline)"})
    steps: int = field(default=100, metadata={"help": "rollout batches"})
    batch_size: int = field(default=4, metadata={"help": "prompts per step"})
    group_size: int = field(default=4, metadata={"help": "samples per prompt (k)"})
    num_iterations: int = field(
        default=1, metadata={"help": "optimizer steps per rollout batch (GRPO's mu)"})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "micro-batches per optimizer step (divides batch_size)"})
    learning_rate: float = field(default=1e-5, metadata={"help": "peak learning rate (Adam)"})
    beta: float = field(
        default=0.04,
        metadata={"help": "KL coefficient (grpo: k3 in the loss; rloo: on the score)"})
    epsilon: float = field(
        default=0.2, metadata={"help": "clip range below 1 (and above, unless epsilon_high)"})
    epsilon_high: float | None = field(
        default=None, metadata={"help": "DAPO's clip-higher (e.g. 0.28); None = epsilon"})
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = field(
        default="grpo", metadata={"help": "sequence or token averaging"})
    scale_rewards: bool = field(
        default=True, metadata={"help": "grpo: divide by the group std (False: Dr. GRPO)"})
    max_new_tokens: int = field(
        default=64, metadata={"help": "response length of samples (tokens)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling (1.0: off)"})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "subtracted from scores of responses without EOS"})
    forward_batch_size: int | None = field(
        default=None, metadata={"help": "rows per no-grad teacher-forced pass (None: all)"})
    old_logprobs: Literal["auto", "rollout", "forward"] = field(
        default="auto", metadata={"help": "where the old log-probs come from: auto | rollout "
                                          "(the sampler's) | forward (teacher forcing)"})
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "global gradient-norm clip (null: off)"})
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW's decoupled weight decay (0: plain Adam)"})
    adam_bias_correction: bool = field(
        default=True, metadata={"help": "bias-corrected Adam, as torch.optim.Adam"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "Adam's epsilon (torch's default)"})
    seed: int = field(default=0, metadata={"help": "prompt order, sampling, adapter init"})
    adapter_name: str = field(default="", metadata={"help": "\"\" = the method's name"})
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

    def validate(self) -> None:
        if not self.adapter_name:
            self.adapter_name = self.method
        n = dist.size()
        per_rank = self.batch_size // n if self.batch_size % n == 0 else 0
        check_values(self, [
            ("method", self.method in ("grpo", "rloo")), ("steps", self.steps >= 1),
            ("batch_size", self.batch_size >= 1 and per_rank >= 1),
            ("group_size", self.group_size >= 2), ("num_iterations", self.num_iterations >= 1),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps >= 1
             and per_rank % self.gradient_accumulation_steps == 0),
            ("learning_rate", self.learning_rate > 0), ("beta", self.beta >= 0),
            ("epsilon", 0 < self.epsilon < 1),
            ("epsilon_high", self.epsilon_high is None or self.epsilon_high > 0),
            ("loss_type", self.loss_type in GRPO_LOSS_TYPES),
            ("max_new_tokens", self.max_new_tokens >= 1), ("temperature", self.temperature > 0),
            ("top_p", 0 < self.top_p <= 1),
            ("forward_batch_size", self.forward_batch_size is None or self.forward_batch_size >= 1),
            ("old_logprobs", self.old_logprobs in OLD_LOGPROBS),
            ("max_grad_norm", self.max_grad_norm is None or self.max_grad_norm > 0),
            ("weight_decay", self.weight_decay >= 0), ("adam_epsilon", self.adam_epsilon >= 0),
            ("adapter_name", "." not in self.adapter_name),
            ("lora_rank", self.lora_rank >= 1), ("lora_alpha", self.lora_alpha > 0),
            ("lora_targets", bool(self.lora_targets)), ("num_layers", self.num_layers >= 0),
            ("save_every", self.save_every >= 0)])


@dataclass
class GRPOResult:
    adapter_dir: Path
    steps: int
    mean_score_first: float
    mean_score_last: float
    history: list[dict]


@dataclass
class _Rows:
    tokens: mx.array
    prompt_lengths: mx.array
    response_tokens: mx.array
    mask: mx.array
    old_logprobs: mx.array
    ref_logprobs: mx.array
    advantages: mx.array

    def take(self, idx: np.ndarray) -> "_Rows":
        return pa.take_rows(self, idx)


class GRPOTrainer(pa.PolicyTrainer):
    """One GRPO/RLOO run's state; `train_grpo` is the entry point."""

    def __init__(self, model: nn.Module, tokenizer, reward_fn: RewardFn, cfg: GRPOConfig,
                 frozen_adapters: Sequence[str] = ()):
        self.role = cfg.method
        self.reward_fn = reward_fn
        super().__init__(model, tokenizer, cfg, frozen_adapters, SALT_INIT)
        self.rollout_logprobs = keep_sampler_logprobs(cfg.old_logprobs, model)

    def rollout(self, prompts: Sequence[Sequence[int]], key: mx.array) -> tuple[Generation, dict]:
        """k samples per prompt (rows grouped by prompt), their policy log-probs (the
        sampler's, or teacher-forced as the update computes them: `old_logprobs`), the
        reference's (teacher-forced) and scores. Data parallel,
        `prompts` is this rank's `distributed.shard` of the step's prompts, and each sample
        takes its row of the whole batch's noise (`generate_batch`'s draw): the ranks'
        samples together are one process's."""
        cfg, model = self.cfg, self.model
        k, n = cfg.group_size, dist.size()
        rows = [p for p in prompts for _ in range(k)]
        draw = None if n == 1 else (
            [g * k + c for g in dist.shard(range(len(prompts) * n)) for c in range(k)],
            len(prompts) * n * k)
        t0 = time.perf_counter()
        with lora.active_adapters(model, self.policy_adapters):
            gen = generate_batch(model, rows, cfg.max_new_tokens, self.eos_ids, self.pad_id,
                                 cfg.temperature, cfg.top_p, key, draw=draw)
            t1 = time.perf_counter()
            old = gen.sample_logprobs if self.rollout_logprobs else \
                batched_response_forward(model, gen, cfg.temperature, None, cfg.forward_batch_size)[0]
        if cfg.beta > 0:
            with lora.active_adapters(model, self.reference_adapters):
                ref, _ = batched_response_forward(model, gen, cfg.temperature, None,
                                                  cfg.forward_batch_size)
        else:
            ref = old
        t2 = time.perf_counter()
        with lora.active_adapters(model, []):          # the reward fn switches in its own adapter
            scores = mx.array(self.reward_fn(gen.tokens, gen.lengths)).astype(mx.float32).reshape(-1)
        mx.eval(scores, old, ref)
        t3 = time.perf_counter()
        if scores.shape[0] != gen.tokens.shape[0]:
            raise MindprintError(f"reward_fn returned {scores.shape[0]} scores for "
                                 f"{gen.tokens.shape[0]} responses")
        return gen, {"old": old, "ref": ref, "scores": scores, "time/generation": t1 - t0,
                     "time/forward": t2 - t1, "time/scoring": t3 - t2}

    def advantages(self, gen: Generation, ro: dict) -> tuple[mx.array, mx.array]:
        """(rewards used, advantages), both (B*k,)."""
        cfg = self.cfg
        scores = ro["scores"]
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (1 - gen.ended.astype(mx.float32))
        if cfg.method == "rloo":
            kl = ((ro["old"] - ro["ref"]) * gen.response_mask).sum(axis=1)
            rewards = scores - cfg.beta * kl
            return rewards, rloo_advantages(rewards, cfg.group_size)
        return scores, group_advantages(scores, cfg.group_size, cfg.scale_rewards)

    def _loss(self, model: nn.Module, part: tuple[_Rows, float]):
        b, total = part
        cfg = self.cfg
        lp, _, _ = response_forward(model, b.tokens, b.prompt_lengths, b.response_tokens, cfg.temperature)
        beta = cfg.beta if cfg.method == "grpo" else 0.0
        loss, st = grpo_loss(lp, b.old_logprobs, b.ref_logprobs if beta else None, b.advantages,
                             b.mask, beta, cfg.epsilon, cfg.epsilon_high, cfg.loss_type,
                             cfg.max_new_tokens, total=total)
        return loss, st

    def update(self, rows: _Rows, total: float) -> dict:
        """cfg.num_iterations optimizer steps on the rollout rows (micro-batched); the loss
        of each micro-batch is its share of the whole batch's (all ranks') loss, so the
        summed gradient is the full batch's, exactly."""
        cfg = self.cfg
        n_prompts = rows.tokens.shape[0] // cfg.group_size
        micro = np.array_split(np.arange(n_prompts), min(cfg.gradient_accumulation_steps, n_prompts))
        parts = [(rows.take((idx[:, None] * cfg.group_size + np.arange(cfg.group_size)).reshape(-1)), total)
                 for idx in micro]
        out = []
        with lora.active_adapters(self.model, self.policy_adapters), \
                gradient_checkpointing(self.model, cfg.grad_checkpoint):
            for _ in range(cfg.num_iterations):
                grads, stats = pa.accumulate(self._loss_and_grad, self.model,
                                             [p for p in parts], [1.0] * len(parts))
                # the stats were summed too: the loss is right as a sum, the means need /parts
                stats = {k: (v if k == "loss/total" else v / len(parts)) for k, v in stats.items()}
                stats["loss"] = stats.pop("loss/total") * dist.size()   # ranks average it below
                out.append(pa.apply_update(self.model, self.optimizer, grads, stats,
                                           cfg.max_grad_norm, self.role, self.step,
                                           sum_over_ranks=True))
        return {k: float(np.mean([s[k] for s in out])) for k in out[0]} | \
            {"first_iteration_ratio_mean": out[0]["policy/ratio_mean"]}

    def train_step(self, prompts: Sequence[Sequence[int]]) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        gen, ro = self.rollout(prompts, pa.step_key(cfg.seed, self.step, SALT_KEY))
        bad = first_nonfinite({"reward score": mx.abs(ro["scores"]).max().item()})
        if bad:
            raise NonFiniteError(f"{self.role}: the {bad[0]} became {bad[1]} at step {self.step + 1}")
        rewards, adv = self.advantages(gen, ro)
        mask = gen.response_mask
        total = loss_denominator(mask, cfg.loss_type, cfg.max_new_tokens)
        if dist.size() > 1:             # the whole batch's denominator, over every rank
            total = float(dist.global_sum(mx.array(total, dtype=mx.float32)).item())
        rows = _Rows(gen.tokens, gen.prompt_lengths, gen.response_tokens, mask, ro["old"], ro["ref"],
                     mx.stop_gradient(adv))
        t_upd = time.perf_counter()
        upd = self.update(rows, total)
        t_end = time.perf_counter()
        k1 = ((ro["old"] - ro["ref"]) * mask).sum(axis=1)
        scores = np.array(ro["scores"])
        resp_len = np.array(gen.response_lengths)
        stats = {
            "objective/scores": float(scores.mean()),
            "objective/scores_std": float(scores.std()),
            "objective/rewards": float(np.array(rewards).mean()),
            "objective/kl": float(k1.mean()),          # summed log-ratio per response, mean
            "objective/frac_zero_std_groups": float(np.array(group_std_is_zero(rewards, cfg.group_size)).mean()),
            f"{self.role}/response_length": float(resp_len.mean()),
            f"{self.role}/eos_fraction": float(np.array(gen.ended).mean()),
            f"{self.role}/time/generation": ro["time/generation"],
            f"{self.role}/time/update": t_end - t_upd,
            f"{self.role}/time/step": t_end - t0,
            f"{self.role}/tokens_per_sec": float(resp_len.sum()) / max(t_end - t0, 1e-9),
            **{f"{self.role}/{k}": v for k, v in upd.items()},
            **pa.memory_stats(self.role, self.base_bytes),
        }
        if dist.size() > 1:
            keys = [k for k in sorted(stats) if k.startswith("objective/")]
            vals = dist.global_mean(mx.array([stats[k] for k in keys], dtype=mx.float32))
            stats.update(dict(zip(keys, vals.tolist())))
        self.step += 1
        return stats


def train_grpo(model: nn.Module, tokenizer, prompts: Sequence[Any], reward_fn: RewardFn,
               cfg: GRPOConfig, out_dir: str | Path, frozen_adapters: Sequence[str] = (),
               resume: bool = False, metrics_path: str | Path | None = None,
               on_step: Callable[[int, dict], None] | None = None) -> GRPOResult:
    """Train the `cfg.adapter_name` adapter with GRPO or RLOO (cfg.method).

    prompts: chat messages, strings or token lists. reward_fn(tokens (B, T) int32,
    lengths (B,)) -> (B,) scores of right-padded prompt + response rows (train_ppo's
    signature; e.g. RewardModel.score_tokens). Writes out_dir/checkpoint/ (exact resume:
    rollouts are keyed by (seed, step)), out_dir/metrics.jsonl and the adapter to
    out_dir/<method>_adapter. Data parallel: every rank passes the same prompts, takes
    every size-th prompt of each step (whole groups, so advantages stay local), samples
    them as one process samples the whole batch (each row its row of the batch's noise),
    and the gradients are summed over ranks of per-rank shares of the global loss.
    """
    if not prompts:
        raise MindprintError("train_grpo: no prompts")
    out = Path(out_dir)
    ckpt = out / "checkpoint"
    metrics = Path(metrics_path) if metrics_path else out / "metrics.jsonl"
    saved_active = lora.get_active(model)
    trainer = GRPOTrainer(model, tokenizer, reward_fn, cfg, frozen_adapters)
    role = trainer.role
    rank, world, _ = dist.world()
    try:
        encoded = pa.encode_prompts(tokenizer, prompts)
        state = pa.restore_or_start(ckpt, metrics, model, trainer.optimizer, resume, role)
        if state is not None:
            trainer.step, trainer.history = int(state["step"]), list(state.get("history", []))
        mx.reset_peak_memory()

        def do_step(step: int) -> dict:
            idx = pa.cycled_indices(len(encoded), step, cfg.batch_size, cfg.seed, SALT_ORDER)
            return trainer.train_step([encoded[i] for i in idx[rank::world]])

        def save() -> None:
            pa.checkpoint(ckpt, model, trainer.optimizer,
                          {"role": role, "step": trainer.step, "seed": cfg.seed,
                           "config": to_dict(cfg), "history": trainer.history})

        pa.run_steps(role, cfg.steps, trainer.step, do_step, save, ckpt, metrics, cfg.save_every,
                     cfg.progress, trainer.norm_start, lambda: pa.adapter_norm(model, cfg.adapter_name),
                     trainer.history, on_step,
                     bar_keys=("objective/scores", "objective/kl", f"{role}/loss"),
                     hint=f"lower {role}.learning_rate or check the reward function")
    finally:
        pa.finish(model, cfg.adapter_name, saved_active)
    adapter_dir = out / f"{role}_adapter"
    if dist.is_main():
        save_adapter(model, cfg.adapter_name, adapter_dir,
                     metadata={"role": role, "stack": trainer.policy_adapters, "steps": trainer.step,
                               "training_config": to_dict(cfg)})
    hist = trainer.history
    return GRPOResult(adapter_dir, trainer.step,
                      hist[0]["objective/scores"] if hist else float("nan"),
                      hist[-1]["objective/scores"] if hist else float("nan"), hist)
