"""The refine phase's method: PPO, GRPO, RLOO, DPO or DITTO, run-wide or per topic.

The gate is the same for every method (`decide.ppo_skip_reason`: the quiz after SFT below
the topic's threshold, refinement enabled, something to learn from); what each method
learns from and which section of the config holds its settings:

| method | learns from (the topic's) | settings | training-batch score |
|---|---|---|---|
| ppo | practice prompts (else SFT + preference), the run's reward model | `ppo:` | objective/scores |
| grpo, rloo | the same prompts and reward model | `grpo:` (method set by refine) | objective/scores |
| dpo | preference pairs and critical distinctions | `dpo:` | rewards/margins |
| ditto | SFT demonstrations | `ditto:` | rewards/margins |

The reference is always the frozen adapters below the topic plus its `sft` adapter: one
base in memory, no second copy. The trained adapter is held in memory under the method's
name (`ppo`, `grpo`, ...), saved to the topic's adapter dir as `{method}_adapter`, and folded
into the unit like the SFT adapter. state.json keeps the phase under its historical name
`ppo` with `method` and `adapter_name` in the record (`adapter_of` reads it back on resume).

Pure parts (which method a topic gets, the checks of the config) are plain functions; the
training (`train`) runs over the pipeline's `Run`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import ConfigError, to_dict

Method = Literal["ppo", "grpo", "rloo", "dpo", "ditto"]
METHODS: tuple[str, ...] = ("ppo", "grpo", "rloo", "dpo", "ditto")
SECTION = {"ppo": "ppo", "grpo": "grpo", "rloo": "grpo", "dpo": "dpo", "ditto": "ditto"}
SCORE_KEY = {"ppo": "objective/scores", "grpo": "objective/scores", "rloo": "objective/scores",
             "dpo": "rewards/margins", "ditto": "rewards/margins"}
TITLE = {"ppo": "PPO", "grpo": "GRPO", "rloo": "RLOO", "dpo": "DPO", "ditto": "DITTO"}
# what a method trains on, in the gate's and the log's words
LEARNS_FROM = {"ppo": "prompts", "grpo": "prompts", "rloo": "prompts",
               "dpo": "preference pairs", "ditto": "demonstrations"}
REWARD_METHODS = ("ppo", "grpo", "rloo")      # climb the run's reward model
PHASE = "ppo"                                 # the refine phase's name in state.json


@dataclass
class RefineSettings:
    """Which method refines a topic whose quiz after SFT is below its threshold."""

    method: Method = field(
        default="ppo", metadata={"help": "ppo, grpo, rloo, dpo or ditto (every topic, unless "
                                         "methods names it)"})
    methods: dict[str, Method] = field(
        default_factory=dict,
        metadata={"help": "per-topic method: topic key (unit/chapter/topic) or topic name -> "
                          "method; a name applies to every topic of that name"})


# ---------------------------------------------------------------- pure: which method, checks

def topic_method(settings: RefineSettings, key: str, name: str) -> str:
    """The method of topic `key` (named `name`): its key's override, else its name's, else
    the run-wide method."""
    return settings.methods.get(key) or settings.methods.get(name) or settings.method


def check_topic_keys(settings: RefineSettings, keys: list[str], names: list[str],
                     source: str) -> None:
    """Every override names a topic of the data (by key or by name)."""
    known = set(keys) | set(names)
    for k in settings.methods:
        if k not in known:
            import difflib

            close = difflib.get_close_matches(k, sorted(known), n=1)
            raise ConfigError(f"key 'refine.methods.{k}': no topic {k!r} in {source}"
                              + (f" (did you mean {close[0]!r}?)" if close else
                                 f" (topics: {', '.join(sorted(keys)[:6])}"
                                 + (", ..." if len(keys) > 6 else "") + ")"))


def methods_used(settings: RefineSettings) -> list[str]:
    """The methods a run may use (run-wide and overrides), in METHODS order."""
    used = {settings.method, *settings.methods.values()}
    return [m for m in METHODS if m in used]


def section(cfg: Any, method: str):
    """The method's trainer config in the pipeline config (grpo and rloo share `grpo:`)."""
    from .decide import trainer_seed

    sec = getattr(cfg, SECTION[method])
    if cfg.seed:                    # the run's seed offsets the trainer's own (decide.trainer_seed)
        sec = dataclasses.replace(sec, seed=trainer_seed(sec.seed, cfg.seed))
    if SECTION[method] == "grpo":
        sec = dataclasses.replace(sec, method=method, adapter_name=method)
    elif sec.adapter_name != method:
        sec = dataclasses.replace(sec, adapter_name=method)
    return sec


def check_config(cfg: Any) -> None:
    """The refine settings against the rest of a PipelineConfig: grpo.method is refine's to
    set, and every method a run may use covers SFT's layers (a unit's adapters combine into
    one adapter, which has one set of layers)."""
    if cfg.grpo.method != "grpo":
        raise ConfigError(f"key 'grpo.method': {cfg.grpo.method!r} is set by refine.method "
                          "(grpo or rloo) in the pipeline; remove grpo.method")
    for m in methods_used(cfg.refine):
        name, sec = SECTION[m], getattr(cfg, SECTION[m])
        if sorted(sec.lora_targets) != sorted(cfg.sft.lora_targets):
            raise ConfigError(f"sft.lora_targets {sorted(cfg.sft.lora_targets)} and {name}.lora_targets "
                              f"{sorted(sec.lora_targets)} must be equal: each unit's adapters "
                              "are combined into one adapter, which needs the same layers")
        if sec.num_layers != cfg.sft.num_layers:
            raise ConfigError(f"sft.num_layers ({cfg.sft.num_layers}) and {name}.num_layers "
                              f"({sec.num_layers or 'all'}) must match: each unit's adapters "
                              "are combined into one adapter, which needs the same layers")


def lora_sections(cfg: Any) -> list[tuple[str, Any]]:
    """(key, section) of every refine method this run may use, for the LoRA-fits check."""
    out = []
    for m in methods_used(cfg.refine):
        if SECTION[m] not in [k for k, _ in out]:
            out.append((SECTION[m], getattr(cfg, SECTION[m])))
    return out


def adapter_of(rec: dict | None) -> str | None:
    """The in-memory name of the adapter a finished refine phase trained (None: skipped).
    Records of runs before the methods have no adapter_name: theirs was `ppo`."""
    if not rec or rec.get("skipped") or not rec.get("adapter"):
        return None
    return rec.get("adapter_name", "ppo")


def memory_settings(cfg: Any, method: str) -> dict:
    """`memory.estimate`'s keyword arguments for one method of this pipeline config."""
    s = section(cfg, method)
    common = {"lora_rank": s.lora_rank, "targets": tuple(s.lora_targets),
              "lora_layers": s.num_layers or None, "grad_checkpoint": s.grad_checkpoint}
    if method in ("grpo", "rloo"):
        return {**common, "batch": s.batch_size, "seq_len": cfg.sft.max_seq_length,
                "max_new_tokens": s.max_new_tokens, "group_size": s.group_size,
                "mini_batch": max(1, s.batch_size // s.gradient_accumulation_steps),
                "forward_batch": s.forward_batch_size}
    if method == "dpo":
        return {**common, "batch": s.batch_size, "seq_len": s.max_seq_length,
                "mini_batch": max(1, s.batch_size // s.gradient_accumulation_steps)}
    if method == "ditto":
        return {**common, "batch": s.batch_size, "seq_len": s.max_seq_length,
                "mini_batch": max(1, s.batch_size // s.gradient_accumulation_steps),
                "max_new_tokens": s.max_new_tokens, "forward_batch": s.sample_batch_size}
    raise ConfigError(f"no memory settings for method {method!r}")


# ---------------------------------------------------------------- what a topic learns from

def preference_pairs(topic) -> list:
    """DPO's pairs: the topic's preference records and its critical distinctions (the
    correct answer preferred), as the reward model sees them."""
    return list(topic.preference) + [d.as_preference() for d in topic.distinctions]


def training_items(method: str, topic) -> list:
    from .phases import ppo_prompts

    if method == "dpo":
        return preference_pairs(topic)
    if method == "ditto":
        return list(topic.sft)
    return ppo_prompts(topic)


# ---------------------------------------------------------------- the phase

def train(run, t, active: list[str], quiz_score: float, method: str, work: Path) -> dict:
    """The refine phase of topic `t` with `method` (the step's compute): the gate, the
    trainer on top of `active`, the adapter saved, the reward before and after, the record."""
    from .. import distributed as dist
    from ..models import lora
    from . import decide
    from .phases import policy_reward, ppo_prompts

    title = TITLE[method]
    items = training_items(method, t.topic)
    reason = decide.ppo_skip_reason(quiz_score, t.threshold, run.cfg.run_ppo, len(items),
                                    what=LEARNS_FROM[method])
    if reason:
        run.echo(f"[{t.key}] {title} skipped: {reason}")
        return {"skipped": True, "reason": reason, "method": method}
    scfg = section(run.cfg, method)
    run.echo(f"[{t.key}] {title} on {len(items)} {LEARNS_FROM[method]} "
             f"(quiz {quiz_score:.3f} < {t.threshold:.2f})")
    prompts = ppo_prompts(t.topic)      # the reward measured before and after: every method
    # Under mlx.launch every rank trains (data parallel); rank 0 alone grades and writes
    # (dist.on_main), and every rank returns its record.
    reward_before = dist.on_main(lambda: policy_reward(run, prompts, active))
    lora.set_active(run.model, active)
    res = _run_trainer(run, method, scfg, items, active, work)
    return dist.on_main(lambda: _write(run, t, method, scfg, items, active, work, res, prompts,
                                       reward_before))


def _write(run, t, method: str, scfg, items: list, active: list[str], work: Path, res,
           prompts: list, reward_before: float) -> dict:
    """Rank 0: the reward after, the adapter and metrics written, the record."""
    from ..models.adapters import adapter_metadata, load_heads, save_adapter
    from . import decide
    from .phases import copy_metrics, policy_reward

    title = TITLE[method]
    reward_after = policy_reward(run, prompts, active + [scfg.adapter_name])
    adir = t.adapter_dir(run) / f"{method}_adapter"
    # keep the trainer's metadata (stack, steps, config) and heads (PPO's value head)
    save_adapter(run.model, scfg.adapter_name, adir,
                 metadata={**adapter_metadata(res.adapter_dir), **t.meta, "phase": "refine",
                           "method": method},
                 heads=load_heads(res.adapter_dir) or None)
    mfiles = copy_metrics(work, run.metrics, f"{method}-{t.slug}")
    if not mfiles and res.history:
        mfiles = [f"{method}-{t.slug}.jsonl"]
        from ..io import atomic_write_text

        atomic_write_text(run.metrics / mfiles[0], "".join(
            json.dumps(h, default=float) + "\n" for h in res.history))
    key = SCORE_KEY[method]
    trend = decide.score_trend(res.history, key=key)
    hist = [h for h in res.history if key in h]
    run.echo(f"[{t.key}] {title}: mean reward on the topic's prompts {reward_before:.3f} -> "
             f"{reward_after:.3f}; training batches ({key}), mean of the first 3 -> last 3: "
             f"{_f(trend['first'])} -> {_f(trend['last'])} "
             f"({'rises' if trend['rises'] else 'DOES NOT RISE'})")
    rel = run.state.rel(adir)
    rec = {"method": method, "adapter": rel, "adapter_name": scfg.adapter_name,
           "artefacts": [rel], "steps": res.steps, "items": len(items), "score_key": key,
           "mean_score_first": float(hist[0][key]) if hist else None,
           "mean_score_last": float(hist[-1][key]) if hist else None,
           "metrics": mfiles, "reward_before": reward_before, "reward_after": reward_after,
           "trend": trend, "config": to_dict(scfg)}
    if method == "ppo":
        rec.update(reward_gain=res.reward_gain, reward_bias=res.reward_bias)
    if method == "ditto":
        rec["pairs_per_round"] = list(res.pairs_per_round)
    return rec


def _run_trainer(run, method: str, scfg, items: list, active: list[str], work: Path):
    if method == "ppo":
        from ..ppo import train_ppo

        return train_ppo(run.model, run.tok, items, run.rm.score_tokens, scfg, work,
                         frozen_adapters=active, resume=run.resume)
    if method in ("grpo", "rloo"):
        from ..grpo import train_grpo

        return train_grpo(run.model, run.tok, items, run.rm.score_tokens, scfg, work,
                          frozen_adapters=active, resume=run.resume)
    if method == "dpo":
        from ..preference import train_dpo

        return train_dpo(run.model, run.tok, items, scfg, work, frozen_adapters=active,
                         resume=run.resume)
    from ..preference import train_ditto

    return train_ditto(run.model, run.tok, items, scfg, work, frozen_adapters=active,
                       resume=run.resume)


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


__all__ = ["RefineSettings", "METHODS", "topic_method", "check_topic_keys", "methods_used",
           "section", "check_config", "lora_sections", "adapter_of", "memory_settings", "train"]
