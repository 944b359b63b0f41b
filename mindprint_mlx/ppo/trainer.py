"""PPO on one base in memory: rollout, score, advantages, clipped updates, adaptive KL.

Roles are adapter sets on the same base weights (one copy of the base in memory):
policy = frozen adapters (e.g. "sft") + the trainable "ppo" adapter, with a value head on
the policy's trunk; reference = the frozen adapters only; reward model = whatever
`reward_fn` switches in (RewardModel.score_tokens activates only its own adapter).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .. import distributed as dist
from ..config import ConfigError, to_dict
from ..errors import MindprintError
from ..guards import (DivergedError, NonFiniteError, check_finite_tensors, divergence,
                      first_nonfinite, seeded, tree_norm)
from ..io import append_jsonl, atomic_dir, atomic_save_safetensors, atomic_write_json, \
    atomic_write_text, read_jsonl
from ..models import lora
from ..models.adapters import load_heads, save_adapter, set_adapter_weights, ADAPTER_WEIGHTS
from ..models.heads import ScalarHead, check_trunk_split, hidden_size
from ..progress import Progress
from ..train.loop import Interrupted, gradient_checkpointing, optimizer_for, stop_now, use_compile
from .advantages import gae, kl_penalized_rewards, masked_whiten
from .kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController
from .losses import ppo_losses
from .reward_norm import RewardNorm, check_declared_adapters, sample_reward_norm, value_head_from_reward
from ..train.policy_adapter import cycled_indices, encode_prompts, init_seed, step_key, take_rows

# Salts of PPO's seeded draws (the prompts of a step, the rollout key, the adapter's init);
# the adapter init's salt matters in small runs: the fast demo and test_ppo_trainer's
# reward rise were checked with this draw.
PROMPT_SALT, STEP_SALT, INIT_SALT = 17, 29, 2
from .rollout import (OLD_LOGPROBS, Generation, activation_dtype, batched_response_forward,
                      gather_generation, generate_batch, keep_sampler_logprobs, response_forward)

log = logging.getLogger(__name__)

RewardFn = Callable[[mx.array, mx.array], Any]


@dataclass
class PPOConfig:
    """PPO hyperparameters; defaults are the classic ones (Ziegler et al. 2019, TRL <= 0.11)."""

    steps: int = field(default=100, metadata={"help": "PPO steps (one rollout batch each)"})
    learning_rate: float = field(default=1.41e-5, metadata={"help": "peak learning rate (Adam)"})
    batch_size: int = field(default=4, metadata={"help": "prompts (rollouts) per step"})
    mini_batch_size: int = field(default=4, metadata={"help": "rollouts per optimizer step"})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "micro-batches per minibatch"})
    ppo_epochs: int = field(
        default=4, metadata={"help": "passes over the rollout batch, reshuffled each time"})
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "global gradient-norm clip (None: off)"})
    adam_bias_correction: bool = field(
        default=True,
        metadata={"help": "bias-corrected Adam, as torch.optim.Adam (TRL's lr assumes it)"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "Adam's epsilon (torch's default)"})
    seed: int = field(
        default=0, metadata={"help": "prompt order, rollout sampling, adapter and value-head init"})
    # KL penalty
    adap_kl_ctrl: bool = field(default=True, metadata={"help": "adaptive (Ziegler) or fixed beta"})
    init_kl_coef: float = field(
        default=0.2, metadata={"help": "KL penalty coefficient beta (start value)"})
    target: float = field(default=6.0, metadata={"help": "target summed KL per response (nats)"})
    horizon: float = field(
        default=10000.0, metadata={"help": "adaptive KL controller's horizon (in responses)"})
    kl_estimator: Literal["k1", "abs", "mse", "k3"] = field(
        default="k1", metadata={"help": "per-token KL estimate: k1 (log ratio), abs, mse or k3"})
    # advantages and losses
    gamma: float = field(default=1.0, metadata={"help": "discount factor of the advantages"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    cliprange: float = field(default=0.2, metadata={"help": "policy ratio clip (1 +- cliprange)"})
    cliprange_value: float = field(
        default=0.2, metadata={"help": "value clip around the rollout's values"})
    vf_coef: float = field(default=0.1, metadata={"help": "weight of the value loss"})
    value_trunk_grad: bool = field(
        default=True,
        metadata={"help": "the value loss also trains the shared trunk's PPO adapter"})
    whiten_rewards: bool = field(
        default=False, metadata={"help": "whiten the per-token rewards of each batch"})
    ratio_threshold: float = field(
        default=10.0,
        metadata={"help": "skip a minibatch (and its optimizer step) above this mean ratio"})
    early_stopping: bool = field(
        default=False, metadata={"help": "stop the epochs when policy KL > 1.5 * target_kl"})
    target_kl: float = field(default=1.0, metadata={"help": "early_stopping's KL bound"})
    # rollouts
    max_new_tokens: int = field(
        default=64, metadata={"help": "response length of rollouts (tokens)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of rollouts"})
    top_p: float = field(
        default=1.0, metadata={"help": "nucleus sampling; 1.0 = pure sampling (recommended for PPO)"})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "subtracted from the score of responses without EOS"})
    score_norm: Literal["none", "scale", "running"] = field(
        default="none", metadata={"help": "none | scale (by a running std) | running (running mean and std)"})
    score_clip: float | None = field(
        default=None, metadata={"help": "clip scores to +-score_clip (null: off)"})
    # OpenAI's reward normalisation (lm-human-preferences): at the start, sample the frozen SFT
    # policy on the prompts, score, and map every score through gain * score + bias so that
    # those samples have mean 0 and std 1 (applied before score_norm, clip and EOS penalty)
    reward_norm: Literal["none", "sft_samples"] = field(
        default="none",
        metadata={"help": "sft_samples: fit gain and bias on SFT-policy samples (mean 0, std 1)"})
    reward_norm_samples: int = field(
        default=64, metadata={"help": "SFT-policy samples the gain and bias are fitted on"})
    value_head_init: Literal["zero", "reward"] = field(
        default="zero",
        metadata={"help": "reward: start the value head from the reward head (gain, bias folded in)"})
    forward_batch_size: int | None = field(
        default=None, metadata={"help": "rows per teacher-forced pass in rollouts (None: all)"})
    # rollout.keep_sampler_logprobs says what each choice does
    old_logprobs: Literal["auto", "rollout", "forward"] = field(
        default="auto", metadata={"help": "where the old log-probs and values come from: "
                                          "auto | rollout (the sampler's) | forward (teacher forcing)"})
    # the trainable adapter and the value head
    adapter_name: str = field(default="ppo", metadata={"help": "name of the trained LoRA adapter"})
    lora_rank: int = field(default=1, metadata={"help": "LoRA rank of the PPO adapter"})
    lora_alpha: float = field(default=1.0, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_targets: list[str] = field(
        default_factory=lambda: list(lora.DEFAULT_TARGETS),
        metadata={"help": "linear layers that get LoRA (names inside a decoder layer)"})
    num_layers: int = field(
        default=0, metadata={"help": "LoRA on the last N decoder layers; 0 = all (as SFTConfig)"})
    grad_checkpoint: bool | None = field(
        default=None,
        metadata={"help": "recompute decoder-layer activations in the update's backward; "
                          "null: as activation_budget decides"})
    # Bases of >= 20M parameters: the update's estimated activations (the memory planner's
    # fit) are kept under activation_budget x the base weight bytes, by turning gradient
    # checkpointing on (grad_checkpoint None) and then splitting minibatches into more
    # micro-batches than gradient_accumulation_steps (token-weighted: the same gradient up
    # to float rounding).
    activation_budget: float | None = field(
        default=0.3, metadata={"help": "bases >= 20M params: keep the update's activations under "
                                       "this x base weight bytes (checkpointing, micro-batches); null: off"})
    compile: bool | None = field(
        default=None, metadata={"help": "mx.compile the update's forward+backward; null: on a GPU "
                                        "only (no gain measured on the CPU backend)"})
    # bookkeeping
    save_every: int = field(
        default=10, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def validate(self) -> None:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"key '{key}': {what}, got {getattr(self, key)!r}")

        from ..config import check_finite_fields

        check_finite_fields(self)
        need(self.steps >= 1, "steps", "must be >= 1")
        need(self.learning_rate > 0, "learning_rate", "must be > 0")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(1 <= self.mini_batch_size <= self.batch_size, "mini_batch_size",
             f"must be between 1 and batch_size ({self.batch_size})")
        need(self.gradient_accumulation_steps >= 1
             and self.mini_batch_size % self.gradient_accumulation_steps == 0,
             "gradient_accumulation_steps", f"must divide mini_batch_size ({self.mini_batch_size})")
        need(self.ppo_epochs >= 1, "ppo_epochs", "must be >= 1")
        need(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "must be > 0 or null")
        need(self.init_kl_coef >= 0, "init_kl_coef", "must be >= 0")
        need(self.target > 0, "target", "must be > 0")
        need(self.horizon > 0, "horizon", "must be > 0")
        need(self.kl_estimator in KL_ESTIMATORS, "kl_estimator", f"must be one of {KL_ESTIMATORS}")
        need(0 <= self.gamma <= 1, "gamma", "must be in [0, 1]")
        need(0 <= self.lam <= 1, "lam", "must be in [0, 1]")
        need(self.cliprange > 0, "cliprange", "must be > 0")
        need(self.cliprange_value > 0, "cliprange_value", "must be > 0")
        need(self.vf_coef >= 0, "vf_coef", "must be >= 0")
        need(self.ratio_threshold > 1, "ratio_threshold", "must be > 1")
        need(self.target_kl > 0, "target_kl", "must be > 0")
        need(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        need(self.temperature > 0, "temperature", "must be > 0 (PPO samples)")
        need(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(self.score_norm in ("none", "scale", "running"), "score_norm",
             "must be none, scale or running")
        need(self.score_clip is None or self.score_clip > 0, "score_clip", "must be > 0 or null")
        need(self.adam_epsilon >= 0, "adam_epsilon", "must be >= 0")
        need(self.reward_norm in ("none", "sft_samples"), "reward_norm", "must be none or sft_samples")
        need(self.reward_norm_samples >= 2, "reward_norm_samples", "must be >= 2")
        need(self.value_head_init in ("zero", "reward"), "value_head_init", "must be zero or reward")
        need(self.forward_batch_size is None or self.forward_batch_size >= 1, "forward_batch_size",
             "must be >= 1 or null")
        need(self.old_logprobs in OLD_LOGPROBS, "old_logprobs",
             "must be auto, rollout or forward")
        need(self.activation_budget is None or self.activation_budget > 0, "activation_budget",
             "must be > 0 or null")
        need(bool(self.adapter_name) and "." not in self.adapter_name, "adapter_name",
             "must be non-empty without '.'")
        need(self.lora_rank >= 1, "lora_rank", "must be >= 1")
        need(bool(self.lora_targets), "lora_targets", "must name at least one layer")
        need(self.num_layers >= 0, "num_layers", "must be >= 0 (0: all layers)")
        need(self.save_every >= 0, "save_every", "must be >= 0")
        n = dist.size()
        if n > 1:   # data parallel: every rank takes an equal share of each batch and minibatch
            need(self.batch_size % n == 0, "batch_size", f"must be a multiple of the number of ranks ({n})")
            need(self.mini_batch_size % n == 0, "mini_batch_size",
                 f"must be a multiple of the number of ranks ({n})")
            need((self.mini_batch_size // n) % self.gradient_accumulation_steps == 0,
                 "gradient_accumulation_steps",
                 f"must divide mini_batch_size / ranks ({self.mini_batch_size // n})")


@dataclass
class PPOResult:
    adapter_dir: Path
    steps: int
    mean_score_first: float
    mean_score_last: float
    history: list[dict]
    reward_gain: float = 1.0              # reward normalisation (1 and 0 when off)
    reward_bias: float = 0.0


class RunningMoments:
    """Running mean and std of scores across steps (TRL's use_score_scaling / use_score_norm)."""

    def __init__(self) -> None:
        self.mean, self.std, self.var, self.count = 0.0, 1.0, 1.0, 1e-24

    def update(self, xs: np.ndarray) -> None:
        xs = np.asarray(xs, dtype=np.float64)
        n = xs.size
        delta = xs.mean() - self.mean
        total = self.count + n
        m2 = self.var * self.count + xs.var() * n + delta ** 2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        # Fewer than two scores have no spread: the unbiased std of one sample is 0/0 (with
        # count's 1e-24 start it came out ~3e-6, so 2.5 became 889,112). Keep std at 1.
        self.std = math.sqrt(self.var * total / (total - 1)) if total >= 2 else 1.0
        self.count = total

    def state_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "var": self.var, "count": self.count}

    def load_state_dict(self, s: dict) -> None:
        self.mean, self.std, self.var, self.count = s["mean"], s["std"], s["var"], s["count"]


class PolicyWithValue(nn.Module):
    """The policy's language model and its value head: the one tree the optimizer sees."""

    def __init__(self, lm: nn.Module, value_head: ScalarHead):
        super().__init__()
        self.lm = lm
        self.value_head = value_head


def base_weight_bytes(model: nn.Module) -> int:
    """Bytes of the base model's own weights (LoRA adapters excluded)."""
    return sum(v.nbytes for k, v in tree_flatten(model.parameters()) if ".adapters." not in k)


AUTO_MEMORY_PARAMS = 20_000_000   # activation_budget applies to bases of this many parameters and up


def _model_shape(model: nn.Module):
    """The memory planner's ModelShape of a loaded model (None where its args are unusual)."""
    from ..memory import ModelShape
    a = getattr(model, "args", None)
    try:
        hidden, inter = int(a.hidden_size), int(a.intermediate_size)
        heads = int(a.num_attention_heads)
        kv = int(getattr(a, "num_key_value_heads", None) or heads)
        hd = int(getattr(a, "head_dim", None) or hidden // heads)
        layers, vocab = len(lora._layers(model)), int(a.vocab_size)
    except (AttributeError, TypeError, ValueError):
        return None
    n = layers * (hidden * hd * (2 * heads + 2 * kv) + 3 * hidden * inter) + vocab * hidden
    return ModelShape(model_type=str(getattr(a, "model_type", "")), n_params=n,
                      weight_bytes=base_weight_bytes(model),
                      dtype_bytes=activation_dtype(model).size, num_layers=layers, hidden=hidden,
                      intermediate=inter, vocab=vocab, num_heads=heads, num_kv_heads=kv,
                      head_dim=hd)


def _check_trainable(policy: PolicyWithValue, adapter_name: str) -> None:
    """Only the PPO adapter and the value head may train."""
    keys = [k for k, _ in tree_flatten(policy.trainable_parameters())]
    stray = [k for k in keys if not (k.startswith("value_head.") or f".adapters.{adapter_name}." in k)]
    if stray:
        raise MindprintError(f"PPO would also train {len(stray)} tensors outside the '{adapter_name}' "
                             f"adapter and the value head (first: {stray[0]}); load other adapters frozen")
    if not any(f".adapters.{adapter_name}." in k for k in keys):
        raise MindprintError(f"the '{adapter_name}' adapter has no trainable tensors")


def _stop_if_nonfinite(step: int, values: dict) -> None:
    bad = first_nonfinite(values)
    if bad:
        raise NonFiniteError(f"ppo: the {bad[0]} became {bad[1]} at step {step + 1}")


@dataclass
class _Batch:
    tokens: mx.array
    prompt_lengths: mx.array
    response_tokens: mx.array
    mask: mx.array
    old_logprobs: mx.array
    old_values: mx.array
    advantages: mx.array
    returns: mx.array

    def rows(self, idx: np.ndarray) -> "_Batch":
        return take_rows(self, idx)


class PPOTrainer:
    """Orchestrates one PPO run; `train_ppo` is the entry point most callers want."""

    def __init__(self, model: nn.Module, tokenizer, reward_fn: RewardFn, cfg: PPOConfig,
                 frozen_adapters: Sequence[str] = (), value_head: ScalarHead | None = None):
        cfg.validate()
        self.model, self.tokenizer, self.reward_fn, self.cfg = model, tokenizer, reward_fn, cfg
        known = lora.adapter_names(model)
        missing = [a for a in frozen_adapters if a not in known]
        if missing:
            raise MindprintError(f"frozen adapter(s) {', '.join(missing)} not in the model "
                                 f"(it has: {', '.join(known) or 'none'})")
        if cfg.adapter_name in known:
            raise MindprintError(f"the model already has an adapter named '{cfg.adapter_name}'; "
                                 "merge or remove it first, or set adapter_name")
        if cfg.adapter_name in frozen_adapters:
            raise MindprintError(f"adapter '{cfg.adapter_name}' cannot be both frozen and trained")
        check_declared_adapters(model, frozen_adapters)
        check_trunk_split(model)          # PPO samples and scores with lm_logits(trunk)
        for a in known:                   # every other adapter (sft, reward, ...) is frozen in PPO
            lora.set_trainable(model, a, False)
        self.reference_adapters = list(frozen_adapters)
        self.policy_adapters = self.reference_adapters + [cfg.adapter_name]
        n_layers = len(lora._layers(model))
        if cfg.num_layers > n_layers:
            raise MindprintError(f"num_layers={cfg.num_layers} but the model has {n_layers} layers")
        layers = range(n_layers - cfg.num_layers, n_layers) if cfg.num_layers else None
        # Initialised from cfg.seed alone (not from whatever the global random state holds
        # after the phases before), so a run resumed between SFT and PPO starts PPO identically.
        with seeded(init_seed(cfg.seed, INIT_SALT)):
            lora.apply_lora(model, cfg.adapter_name, targets=cfg.lora_targets, r=cfg.lora_rank,
                            alpha=cfg.lora_alpha, layers=layers, trainable=True, enabled=False)
            self.value_head = value_head if value_head is not None else ScalarHead(hidden_size(model))
        model.eval()                      # dropout off in every role: rollout and update must agree
        self.norm_start = self.adapter_norm()   # (the same on resume: the init is seeded)
        self.policy = PolicyWithValue(model, self.value_head)
        _check_trainable(self.policy, cfg.adapter_name)
        self.optimizer = optimizer_for(cfg, cfg.learning_rate)
        self.kl_ctl = (AdaptiveKLController(cfg.init_kl_coef, cfg.target, cfg.horizon)
                       if cfg.adap_kl_ctrl else FixedKLController(cfg.init_kl_coef))
        self.score_moments = RunningMoments()
        self.reward_norm: RewardNorm | None = None     # set by init_reward_norm (train_ppo does)
        self.step = 0
        self.history: list[dict] = []
        self.base_bytes = base_weight_bytes(model)
        self.shape = _model_shape(model)
        from ..data.batching import eos_ids, pad_id
        self.eos_ids = eos_ids(tokenizer)
        self.pad_id = pad_id(tokenizer)
        self._loss_and_grad = nn.value_and_grad(self.policy, self._loss)
        if use_compile(cfg.compile):
            self._loss_and_grad = self._compiled_loss_and_grad()
        self.rollout_logprobs = keep_sampler_logprobs(cfg.old_logprobs, model)

    # ------------------------------------------------------------------ rollout

    def rollout(self, prompts: Sequence[Sequence[int]], key: mx.array,
                draw: tuple[Sequence[int], int] | None = None) -> tuple[Generation, dict]:
        """Sample (keeping the sampler's log-probs and values), teacher-force the reference
        (and the policy, where `old_logprobs` says so), then score. `draw`: which rows of
        the whole batch these prompts are (`generate_batch`)."""
        cfg, model = self.cfg, self.model
        t0 = time.perf_counter()
        with lora.active_adapters(model, self.policy_adapters):
            gen = generate_batch(model, prompts, cfg.max_new_tokens, self.eos_ids, self.pad_id,
                                 cfg.temperature, cfg.top_p, key,
                                 value_head=self.value_head if self.rollout_logprobs else None,
                                 draw=draw)
        t1 = time.perf_counter()
        if self.rollout_logprobs:   # the sampler's own (masked) log-probs and values
            logprobs, values = gen.sample_logprobs, gen.sample_values
        else:
            with lora.active_adapters(model, self.policy_adapters):
                logprobs, values = batched_response_forward(model, gen, cfg.temperature,
                                                            self.value_head, cfg.forward_batch_size)
        with lora.active_adapters(model, self.reference_adapters):
            ref_logprobs, _ = batched_response_forward(model, gen, cfg.temperature, None,
                                                       cfg.forward_batch_size)
        t2 = time.perf_counter()
        with lora.active_adapters(model, []):   # the reward fn switches in its own adapter
            scores = mx.array(self.reward_fn(gen.tokens, gen.lengths)).astype(mx.float32).reshape(-1)
        mx.eval(scores)
        t3 = time.perf_counter()
        if scores.shape[0] != gen.tokens.shape[0]:
            raise MindprintError(f"reward_fn returned {scores.shape[0]} scores for "
                                 f"{gen.tokens.shape[0]} responses")
        return gen, {"logprobs": logprobs, "values": values, "ref_logprobs": ref_logprobs,
                     "scores": scores, "time/generation": t1 - t0, "time/forward": t2 - t1,
                     "time/scoring": t3 - t2}

    def init_reward_norm(self, prompts: Sequence[Sequence[int]]) -> RewardNorm:
        """Fit reward normalisation on SFT-policy samples of these tokenized prompts
        (cfg.reward_norm); `train_ppo` calls it once, before the first step."""
        self.reward_norm = sample_reward_norm(self, prompts, self.cfg.reward_norm_samples)
        return self.reward_norm

    def init_value_head_from_reward(self, reward_head: ScalarHead) -> None:
        """cfg.value_head_init == "reward": the value head starts as the reward head (with
        the reward normalisation folded in); call after `init_reward_norm`."""
        head = value_head_from_reward(reward_head, hidden_size(self.model), self.reward_norm)
        self.value_head.update(head.parameters())
        mx.eval(self.value_head.parameters())

    def _process_scores(self, raw: mx.array, ended: mx.array) -> mx.array:
        cfg = self.cfg
        scores = raw
        if cfg.reward_norm != "none":
            if self.reward_norm is None:
                raise MindprintError("reward_norm is on but not fitted: call "
                                     "PPOTrainer.init_reward_norm(prompts) first (train_ppo does)")
            scores = self.reward_norm.apply(scores)
        if cfg.score_norm != "none":
            self.score_moments.update(np.array(scores).reshape(-1))
            std = self.score_moments.std
            scale = (std if std > 1e-6 else 1.0) + np.finfo(np.float32).eps   # no spread yet: 1
            scores = (scores - self.score_moments.mean) / scale if cfg.score_norm == "running" \
                else scores / scale
        if cfg.score_clip is not None:
            scores = mx.clip(scores, -cfg.score_clip, cfg.score_clip)
        if cfg.missing_eos_penalty is not None:
            # Without it policies learn to ramble to the length limit without an EOS.
            scores = scores - cfg.missing_eos_penalty * (1 - ended.astype(mx.float32))
        return scores.astype(mx.float32)

    # ------------------------------------------------------------------ update

    def _loss(self, policy: PolicyWithValue, b: _Batch):
        cfg = self.cfg
        logprobs, values, entropy = response_forward(policy.lm, b.tokens, b.prompt_lengths,
                                                     b.response_tokens, cfg.temperature,
                                                     policy.value_head, return_entropy=True,
                                                     detach_values=not cfg.value_trunk_grad)
        return ppo_losses(logprobs, b.old_logprobs, values, b.old_values, b.advantages, b.returns,
                          b.mask, cfg.cliprange, cfg.cliprange_value, cfg.vf_coef, entropy=entropy)

    def _compiled_loss_and_grad(self):
        """`_loss_and_grad` under mx.compile (same signature and results).

        The compiled function returns the statistics stacked into one array: MLX 0.32's
        compile fails (IndexError: _Map_base::at, in compile_simplify) when two of a compiled
        function's outputs are equal expressions and one of them is a stop_gradient, e.g.
        `mx.compile(lambda x: (x + 0, mx.stop_gradient(x + 0)))(x)`, and the PPO statistics
        hold such pairs (loss/total is stop_gradient(loss); val/vpred equals val/mean)."""
        plain = self._loss_and_grad
        keys: list[str] = []

        def fn(*fields):
            (loss, stats), grads = plain(self.policy, _Batch(*fields))
            keys[:] = sorted(stats)
            return loss, mx.stack([stats[k].astype(mx.float32) for k in keys]), grads

        state = [self.policy.state]
        compiled = mx.compile(fn, inputs=state, outputs=state)

        def loss_and_grad(policy, b: _Batch):
            loss, stacked, grads = compiled(*(getattr(b, f) for f in b.__dataclass_fields__))
            return (loss, {k: stacked[i] for i, k in enumerate(keys)}), grads

        return loss_and_grad

    def memory_plan(self, rows: int, length: int) -> tuple[bool, int]:
        """(gradient checkpointing, micro-batches) for minibatches of `rows` rows of
        `length` tokens: cfg.grad_checkpoint and gradient_accumulation_steps, or what
        cfg.activation_budget needs on a base of >= AUTO_MEMORY_PARAMS parameters."""
        from ..memory import _activations
        cfg = self.cfg
        gc, ga = bool(cfg.grad_checkpoint), min(cfg.gradient_accumulation_steps, rows)
        if cfg.activation_budget is None or self.shape is None or self.shape.n_params < AUTO_MEMORY_PARAMS:
            return gc, ga
        budget = cfg.activation_budget * self.base_bytes
        act = lambda n, g: _activations(self.shape, n, length, g, True, cfg.lora_rank,
                                        len(cfg.lora_targets))
        if cfg.grad_checkpoint is None and act(-(-rows // ga), False) > budget:
            gc = True
        while ga < rows and act(-(-rows // ga), gc) > budget:
            ga += 1
        return gc, ga

    def _minibatch(self, mb: _Batch, ga: int | None = None) -> tuple[dict, bool]:
        """Gradients over the minibatch's micro-batches, then one (possibly skipped) step."""
        cfg = self.cfg
        n = mb.tokens.shape[0]
        ga = min(ga or cfg.gradient_accumulation_steps, n)
        micro = np.array_split(np.arange(n), ga)
        # Each micro-batch's losses are token means: weighted by its share of the minibatch's
        # response tokens, the sum is the gradient of the minibatch's token mean (as ga=1).
        tok = np.array(mb.mask.sum(axis=1))
        n_tok = max(float(tok.sum()), 1.0)
        grads, stats = None, None
        for idx in micro:
            (_, st), g = self._loss_and_grad(self.policy, mb.rows(idx))
            w = float(tok[idx].sum()) / n_tok
            g = tree_map(lambda x: x * w, g)
            st = {k: v * w for k, v in st.items()}
            grads = g if grads is None else tree_map(mx.add, grads, g)
            stats = st if stats is None else {k: stats[k] + st[k] for k in stats}
            mx.eval(grads, stats)
        if dist.size() > 1:
            # Before the skip check: every rank takes the same decision (or some would wait
            # forever in the next all-reduce). Token means over the whole minibatch, as one
            # process computes them (statistics weighted by each rank's tokens, like micro-batches).
            grads = dist.average_gradients(grads, weight=n_tok)
            keys = sorted(stats)
            tot = dist.global_sum(mx.concatenate([
                mx.stack([stats[k].astype(mx.float32) for k in keys]) * n_tok,
                mx.array([n_tok], dtype=mx.float32)]))
            stats = dict(zip(keys, (tot[:-1] / tot[-1]).tolist()))
        stats = {k: float(v) for k, v in stats.items()}
        if cfg.max_grad_norm is None:
            norm = mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _, g in tree_flatten(grads)))
        else:
            grads, norm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
        stats["policy/grad_norm"] = float(norm)
        # Before the update: a non-finite loss or gradient never reaches the weights.
        _stop_if_nonfinite(self.step, {"loss": stats.get("loss/total"),
                                       "gradient norm": stats["policy/grad_norm"]})
        if stats["policy/ratio_mean"] > cfg.ratio_threshold:
            # Skip the optimizer step too, or Adam's momentum still moves the weights.
            return stats, False
        self.optimizer.update(self.policy, grads)
        mx.eval(self.policy.trainable_parameters(), self.optimizer.state)
        return stats, True

    def update(self, batch: _Batch, rng: np.random.Generator) -> dict:
        """`ppo_epochs` passes over the whole batch (every rank's rows) in shuffled minibatches
        of `mini_batch_size`; each rank computes its `distributed.shard` of each minibatch."""
        cfg = self.cfg
        B = batch.tokens.shape[0]
        all_stats: list[dict] = []
        skipped, early = 0, False
        mbs = cfg.mini_batch_size
        gc, ga = self.memory_plan(min(mbs // dist.size(), B), batch.tokens.shape[1])
        with lora.active_adapters(self.model, self.policy_adapters), \
                gradient_checkpointing(self.model, gc):
            for _ in range(cfg.ppo_epochs):
                order = rng.permutation(B)       # a fresh shuffle each epoch
                for s in range(0, B, mbs):
                    stats, stepped = self._minibatch(batch.rows(dist.shard(order[s:s + mbs])), ga)
                    skipped += not stepped
                    all_stats.append(stats)
                    if cfg.early_stopping and stats["policy/policykl"] > 1.5 * cfg.target_kl:
                        early = True
                        break
                if early:
                    break
        keys = set().union(*all_stats)
        out = {k: float(np.mean([s[k] for s in all_stats if k in s])) for k in sorted(keys)}
        out["first_minibatch_ratio_mean"] = all_stats[0]["policy/ratio_mean"]
        out["skipped_minibatches"] = skipped
        out["minibatches"] = len(all_stats)
        out["early_stopped"] = int(early)
        out["grad_checkpoint"], out["micro_batches"] = int(gc), ga
        return out

    # ------------------------------------------------------------------ one step

    def train_step(self, prompts: Sequence[Sequence[int]]) -> dict:
        """One PPO step on these tokenized prompts; returns the step's stats.

        Data parallel, `prompts` is this rank's `distributed.shard` of the step's batch: each
        rank samples and scores its rows (each with its row of the whole batch's noise), then
        every rank holds the whole batch (`gather_generation`), so advantages, whitening, score
        and KL statistics are one process's, and `update` splits each minibatch."""
        cfg = self.cfg
        t_start = time.perf_counter()
        n = dist.size()
        draw = None if n == 1 else (dist.shard(range(len(prompts) * n)), len(prompts) * n)
        gen, ro = self.rollout(prompts, step_key(cfg.seed, self.step, STEP_SALT), draw)
        gen, whole = gather_generation(
            gen, {k: ro[k] for k in ("logprobs", "values", "ref_logprobs", "scores")}, self.pad_id)
        ro.update(whole)
        mask = gen.response_mask
        beta = self.kl_ctl.value
        scores = self._process_scores(ro["scores"], gen.ended)
        _stop_if_nonfinite(self.step, {"reward score": mx.abs(ro["scores"]).max().item(),
                                       "processed score": mx.abs(scores).max().item()})
        rewards, kl = kl_penalized_rewards(scores, ro["logprobs"], ro["ref_logprobs"], mask, beta,
                                           cfg.kl_estimator)
        non_score_reward = -beta * kl
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
        advantages, returns = gae(rewards, ro["values"], mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask) * mask
        batch = _Batch(gen.tokens, gen.prompt_lengths, gen.response_tokens, mask, ro["logprobs"],
                       ro["values"], mx.stop_gradient(advantages), mx.stop_gradient(returns))
        mx.eval(batch.advantages, batch.returns, kl, non_score_reward)
        t_upd = time.perf_counter()
        upd = self.update(batch, np.random.default_rng([cfg.seed, self.step, 31]))
        t_end = time.perf_counter()

        mean_kl = float(kl.sum(axis=1).mean())     # batch mean of each sequence's summed KL
        _stop_if_nonfinite(self.step, {"KL": mean_kl})
        self.kl_ctl.update(mean_kl, cfg.batch_size)  # once per batch, after the update
        resp_len = np.array(gen.response_lengths)
        n_tokens = int(resp_len.sum())
        raw = np.array(ro["scores"])
        used = np.array(scores)
        nsr = float(non_score_reward.sum(axis=1).mean())
        stats = {
            "objective/kl": mean_kl,
            "objective/kl_coef": beta,
            "objective/entropy": float((-ro["logprobs"] * mask).sum(axis=1).mean()),
            "objective/scores": float(raw.mean()),
            "objective/scores_std": float(raw.std()),
            "objective/non_score_reward": nsr,
            "objective/total_reward": float(used.mean()) + nsr,
            "ppo/mean_scores": float(used.mean()),
            "ppo/std_scores": float(used.std()),
            "ppo/response_length": float(resp_len.mean()),
            "ppo/eos_fraction": float(np.array(gen.ended).mean()),
            "ppo/kl_coef_next": self.kl_ctl.value,
            "ppo/time/generation": ro["time/generation"],
            "ppo/time/forward": ro["time/forward"],
            "ppo/time/scoring": ro["time/scoring"],
            "ppo/time/update": t_end - t_upd,
            "ppo/time/step": t_end - t_start,
            "ppo/generation_tokens_per_sec": n_tokens / max(ro["time/generation"], 1e-9),
            "ppo/tokens_per_sec": n_tokens / max(t_end - t_start, 1e-9),
            "ppo/memory/peak_bytes": int(mx.get_peak_memory()),
            "ppo/memory/base_weight_bytes": self.base_bytes,
            "ppo/memory/peak_over_base": mx.get_peak_memory() / max(self.base_bytes, 1),
            "ppo/sampling/temperature": cfg.temperature,   # what the rollouts sampled with
            "ppo/sampling/top_p": cfg.top_p,
        }
        if self.reward_norm is not None:
            stats["ppo/reward_norm/gain"] = self.reward_norm.gain
            stats["ppo/reward_norm/bias"] = self.reward_norm.bias
        stats.update({f"ppo/{k}": v for k, v in upd.items()})
        if dist.size() > 1:   # times, throughput and memory are each rank's: their means over ranks
            keys = sorted(k for k in stats if k.startswith(("ppo/time/", "ppo/memory/"))
                          or k.endswith("tokens_per_sec"))
            vals = dist.global_mean(mx.array([float(stats[k]) for k in keys], dtype=mx.float32))
            stats.update({k: (type(stats[k])(v) if isinstance(stats[k], int) else v)
                          for k, v in zip(keys, vals.tolist())})
        if mean_kl < -1:
            log.warning("step %d: mean KL %.3f < -1: the log-probabilities do not reproduce the "
                        "rollout (teacher forcing disagrees with sampling)", self.step, mean_kl)
        self.step += 1
        return stats

    # ------------------------------------------------------------------ checkpoints

    def adapter_norm(self) -> float:
        return tree_norm(lora.adapter_state(self.model, self.cfg.adapter_name))

    def save_checkpoint(self, ckpt_dir: Path) -> None:
        check_finite_tensors(dict(tree_flatten(self.optimizer.state)), f"{ckpt_dir}: the optimizer state")
        state = {"step": self.step, "kl_ctl": self.kl_ctl.state_dict(),
                 "score_moments": self.score_moments.state_dict(), "seed": self.cfg.seed,
                 "reward_norm": self.reward_norm.to_dict() if self.reward_norm else None,
                 "rng": "derived from (seed, step)", "history": self.history,
                 "config": to_dict(self.cfg)}
        with atomic_dir(ckpt_dir) as tmp:
            save_adapter(self.model, self.cfg.adapter_name, tmp / "adapter",
                         metadata={"role": "ppo", "step": self.step}, heads={"value": self.value_head})
            atomic_save_safetensors(tmp / "optimizer.safetensors",
                                    dict(tree_flatten(self.optimizer.state)))
            atomic_write_json(tmp / "trainer_state.json", state)

    def load_checkpoint(self, ckpt_dir: Path) -> None:
        try:
            state = json.loads((ckpt_dir / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise MindprintError(f"{ckpt_dir}: unreadable PPO checkpoint ({e})") from None
        set_adapter_weights(self.model, self.cfg.adapter_name,
                            mx.load(str(ckpt_dir / "adapter" / ADAPTER_WEIGHTS)),
                            source=ckpt_dir / "adapter" / ADAPTER_WEIGHTS)
        lora.set_trainable(self.model, self.cfg.adapter_name, True)
        head = load_heads(ckpt_dir / "adapter").get("value")
        if head is None:
            raise MindprintError(f"{ckpt_dir}/adapter: no value head in the checkpoint")
        self.value_head.update(head.parameters())
        opt_state = mx.load(str(ckpt_dir / "optimizer.safetensors"))
        self.optimizer.state = tree_unflatten(list(opt_state.items()))
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.score_moments.load_state_dict(state["score_moments"])
        rn = state.get("reward_norm")
        self.reward_norm = RewardNorm.from_dict(rn) if rn else None
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        mx.eval(self.policy.parameters(), self.optimizer.state)

    def sync_from_main(self) -> None:
        """Data parallel resume: rank 0 loaded the checkpoint (only its disk need hold it);
        copy its adapter, value head, optimizer state and trainer state to every rank."""
        if dist.size() == 1:
            return
        main = dist.is_main()
        params = dist.broadcast(dict(tree_flatten(self.policy.trainable_parameters())))
        self.policy.load_weights(list(params.items()), strict=False)
        opt = dist.broadcast_named(dict(tree_flatten(self.optimizer.state)) if main else None)
        self.optimizer.state = tree_unflatten(list(opt.items()))
        st = dist.broadcast_json({"kl_ctl": self.kl_ctl.state_dict(),
                                  "score_moments": self.score_moments.state_dict(),
                                  "reward_norm": self.reward_norm.to_dict() if self.reward_norm else None,
                                  "step": self.step, "history": self.history} if main else None)
        self.kl_ctl.load_state_dict(st["kl_ctl"])
        self.score_moments.load_state_dict(st["score_moments"])
        self.reward_norm = RewardNorm.from_dict(st["reward_norm"]) if st.get("reward_norm") else None
        self.step, self.history = int(st["step"]), list(st["history"])
        mx.eval(self.policy.parameters(), self.optimizer.state)


def _last_good(ckpt: Path) -> str:
    try:
        step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no PPO checkpoint had been written yet"
    return f"the last good checkpoint (step {step}) is kept in {ckpt}"


def train_ppo(model: nn.Module, tokenizer, prompts: Sequence[Any], reward_fn: RewardFn,
              cfg: PPOConfig, out_dir: str | Path, frozen_adapters: Sequence[str] = (),
              resume: bool = False, value_head: ScalarHead | None = None,
              metrics_path: str | Path | None = None,
              reward_head: ScalarHead | None = None,
              on_step: Callable[[int, dict], None] | None = None) -> PPOResult:
    """Train the `cfg.adapter_name` LoRA adapter (plus a value head) with PPO.

    prompts: chat messages (list of {"role", "content"}), plain strings (one user turn) or
    token lists. reward_fn(tokens (B, T) int32, lengths (B,)) -> (B,) scores of right-padded
    prompt + response rows, e.g. RewardModel.score_tokens. Writes out_dir/checkpoint/
    (resumable), out_dir/metrics.jsonl and the final adapter (with the value head) to
    out_dir/ppo_adapter. Afterwards the model keeps the PPO adapter, frozen and inactive.
    `on_step(step, stats)` runs after every PPO step (e.g. an evaluation on held-out prompts).

    Data parallel (under `mlx.launch`): every rank passes the same prompts and takes its
    share of each step's prompts and samples its rows of the whole batch (each with its row of
    the batch's noise), then every rank holds the whole batch and computes its share of each
    minibatch (gradients and minibatch statistics averaged over ranks, by tokens), so the
    run equals one process up to float rounding; rank 0 alone writes. A stop request (`mindprint_mlx.stop.request_stop`, the first
    Ctrl-C) checkpoints after the current step and raises `Interrupted`.

    cfg.reward_norm="sft_samples" fits the reward normalisation before the first step (a
    resumed run reads it from the checkpoint). cfg.value_head_init="reward" starts the value
    head from `reward_head`, by default the head of the RewardModel whose `score_tokens` is
    `reward_fn`.
    """
    if not prompts:
        raise MindprintError("train_ppo: no prompts")
    out = Path(out_dir)
    ckpt = out / "checkpoint"
    metrics = Path(metrics_path) if metrics_path else out / "metrics.jsonl"
    saved_active = lora.get_active(model)
    if cfg.value_head_init == "reward":
        if value_head is not None:
            raise MindprintError("train_ppo: pass value_head or set value_head_init=reward, not both")
        reward_head = reward_head or getattr(getattr(reward_fn, "__self__", None), "head", None)
        if not isinstance(reward_head, ScalarHead):
            raise MindprintError("value_head_init=reward needs the reward head: pass reward_head, "
                                 "or a RewardModel's score_tokens as reward_fn")
    trainer = PPOTrainer(model, tokenizer, reward_fn, cfg, frozen_adapters, value_head)
    encoded = encode_prompts(tokenizer, prompts)
    rank, world_size, _ = dist.world()
    main = rank == 0
    has_ckpt = resume and (ckpt / "trainer_state.json").is_file()
    if world_size > 1:
        has_ckpt = bool(dist.broadcast_json(has_ckpt if main else None))   # rank 0's disk decides
    if has_ckpt:
        if main:
            trainer.load_checkpoint(ckpt)
            kept = [r for r in read_jsonl(metrics) if r.get("step", 0) <= trainer.step]
            atomic_write_text(metrics, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        trainer.sync_from_main()
        log.info("resuming PPO from step %d (%s)", trainer.step, ckpt)
    elif metrics.exists() and main:
        metrics.unlink()                 # a fresh run starts a fresh metrics file
    if cfg.reward_norm != "none" and trainer.reward_norm is None:
        trainer.init_reward_norm(encoded)          # the same on every rank (seeded)
    if not has_ckpt and cfg.value_head_init == "reward":
        trainer.init_value_head_from_reward(reward_head)
    mx.reset_peak_memory()
    bar = Progress(cfg.steps, "ppo", enabled=cfg.progress and main, initial=trainer.step)

    def checkpoint() -> None:
        if main:
            trainer.save_checkpoint(ckpt)

    try:
        while trainer.step < cfg.steps:
            idx = cycled_indices(len(encoded), trainer.step, cfg.batch_size, cfg.seed, PROMPT_SALT)
            idx = idx[rank::world_size]              # this rank's share (all of it on one process)
            try:
                stats = trainer.train_step([encoded[i] for i in idx])
                why = divergence(None, None, trainer.norm_start, trainer.adapter_norm())
                if why:
                    raise DivergedError(f"ppo: diverged at step {trainer.step}: {why}")
            except (NonFiniteError, DivergedError) as e:
                raise type(e)(f"{e}; {_last_good(ckpt)} (lower ppo.learning_rate or check the "
                              "reward model)") from None
            record = {"step": trainer.step, **stats}
            trainer.history.append(record)
            if main:
                append_jsonl(metrics, record)
            if on_step is not None:
                on_step(trainer.step, record)
            if stats["objective/kl"] < -1:
                bar.write(f"warning: step {trainer.step}: mean KL {stats['objective/kl']:.3f} < -1")
            bar.update(1, score=stats["objective/scores"], kl=stats["objective/kl"],
                       beta=stats["objective/kl_coef"], ent=stats["objective/entropy"],
                       pg=stats.get("ppo/loss/policy", 0.0), vf=stats.get("ppo/loss/value", 0.0),
                       clip=stats.get("ppo/policy/clipfrac", 0.0),
                       ev=stats.get("ppo/val/explained_variance", 0.0),
                       len=stats["ppo/response_length"], tok_s=stats["ppo/tokens_per_sec"])
            saved_now = cfg.save_every and trainer.step % cfg.save_every == 0
            if saved_now and trainer.step < cfg.steps:
                checkpoint()
            if trainer.step < cfg.steps and stop_now():
                if not saved_now:
                    checkpoint()
                bar.write(f"ppo: stopped at step {trainer.step}; checkpoint in {ckpt}")
                raise Interrupted("ppo", trainer.step, ckpt)
        checkpoint()
    finally:
        bar.close()
        lora.set_trainable(model, cfg.adapter_name, False)
        for path, m in lora.lora_layers(model):
            m.active = saved_active.get(path, frozenset())
    adapter_dir = out / "ppo_adapter"
    if main:
        save_adapter(model, cfg.adapter_name, adapter_dir,
                     metadata={"role": "ppo", "stack": trainer.policy_adapters,
                               "steps": trainer.step, "training_config": to_dict(cfg),
                               "reward_norm": trainer.reward_norm.to_dict() if trainer.reward_norm
                               else None},
                     heads={"value": trainer.value_head})
    hist = trainer.history
    return PPOResult(adapter_dir=adapter_dir, steps=trainer.step,
                     mean_score_first=hist[0]["objective/scores"] if hist else float("nan"),
                     mean_score_last=hist[-1]["objective/scores"] if hist else float("nan"),
                     history=hist,
                     reward_gain=trainer.reward_norm.gain if trainer.reward_norm else 1.0,
                     reward_bias=trainer.reward_norm.bias if trainer.reward_norm else 0.0)
