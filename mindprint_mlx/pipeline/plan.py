"""The topic plan (shared by the dry run and the real run) and a rough time/memory estimate."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

from ..errors import MindprintError
from .merge import plan_final_sizes
from .config import PipelineConfig


def load_curriculum(cfg: PipelineConfig):
    """(dataset, curriculum) of the config's data dir and unit/topic filters."""
    from ..data import load_data_dir
    from ..data.curriculum import build_curriculum

    if not Path(cfg.data_dir).exists():
        raise MindprintError(f"key 'data_dir': directory not found: {cfg.data_dir}")
    dataset = load_data_dir(cfg.data_dir)
    curriculum = build_curriculum(dataset, units=cfg.units or None, topics=cfg.topics or None)
    if not curriculum.topics:
        raise MindprintError(f"{cfg.data_dir}: no topics to train"
                             + (f" (units={cfg.units}, topics={cfg.topics})" if cfg.units or cfg.topics else ""))
    from .refine import check_topic_keys

    every = build_curriculum(dataset).topics        # an override may name a filtered-out topic
    check_topic_keys(cfg.refine, [t.key for t in every], [t.name for t in every], cfg.data_dir)
    return dataset, curriculum


def plan_topics(cfg: PipelineConfig, dataset, curriculum) -> list[dict]:
    """Every topic with its data counts, quality, adaptive decisions and their reasons."""
    from ..data import quality
    from .decide import topic_plan
    from .refine import topic_method

    return [{**topic_plan(t, quality.topic_quality(t, dataset.persona), cfg.adaptive),
             "refine_method": topic_method(cfg.refine, t.key, t.name)}
            for t in curriculum.topics]


# ---------------------------------------------------------------- estimate

def _model_config(model: str) -> dict | None:
    """config.json of a model on this machine (a directory or the hub cache), else None:
    the dry run never downloads."""
    p = Path(model).expanduser()
    if (p / "config.json").is_file():
        return json.loads((p / "config.json").read_text())
    try:
        from huggingface_hub import try_to_load_from_cache

        f = try_to_load_from_cache(model, "config.json")
        if isinstance(f, str):
            return json.loads(Path(f).read_text())
    except Exception:  # noqa: BLE001 - an estimate never fails a dry run
        pass
    return None


def memory_settings(cfg: PipelineConfig, phase: str, plan: list[dict] | None = None) -> dict:
    """`memory.estimate`'s keyword arguments for one phase of this config: its batch, row
    length, LoRA rank, targets and layers, gradient checkpointing (and PPO's rollout). SFT's
    batch is the largest the topic plan gives (`plan`), else `sft.batch_size`."""
    if phase == "sft":
        s = cfg.sft
        batches = [p["plan"]["batch_size"] for p in plan or [] if p["plan"]["trainable"]]
        return {"batch": max(batches or [s.batch_size]), "seq_len": s.max_seq_length,
                "lora_rank": s.lora_rank, "targets": tuple(s.lora_targets),
                "lora_layers": s.num_layers or None, "grad_checkpoint": s.grad_checkpoint}
    if phase == "reward":
        r = cfg.reward.train
        return {"batch": r.batch_size, "seq_len": r.max_seq_length, "lora_rank": r.lora_rank,
                "targets": tuple(r.lora_targets), "lora_layers": r.num_layers or None,
                "grad_checkpoint": r.grad_checkpoint}
    if phase == "ppo":
        p = cfg.ppo
        # rollouts: the topic's prompts (SFT rows' prompts, at most sft.max_seq_length long)
        return {"batch": p.batch_size, "seq_len": cfg.sft.max_seq_length,
                "max_new_tokens": p.max_new_tokens, "lora_rank": p.lora_rank,
                "targets": tuple(p.lora_targets), "lora_layers": p.num_layers or None,
                "grad_checkpoint": p.grad_checkpoint, "mini_batch": p.mini_batch_size,
                "forward_batch": p.forward_batch_size}
    from .refine import METHODS, memory_settings as refine_settings

    if phase in METHODS:
        return refine_settings(cfg, phase)
    raise MindprintError(f"phase must be sft, reward or one of {', '.join(METHODS)}, got {phase!r}")


def run_phases(cfg: PipelineConfig) -> list[str]:
    """The training phases this config runs (every refine method it may use)."""
    from .refine import methods_used

    return ["sft"] + ([] if cfg.reward.path else ["reward"]) + \
        (methods_used(cfg.refine) if cfg.run_ppo else [])


def estimate(cfg: PipelineConfig, plan: list[dict], dataset) -> dict:
    """Peak memory per phase (`memory.estimate`, the planner tests/test_plan.py checks against
    measured peaks) and a rough wall time (upper bound: PPO on every topic)."""
    from .. import memory

    src = cfg.model if Path(cfg.model).expanduser().is_dir() else _model_config(cfg.model)
    if src is None:
        return {"note": f"no config.json for {cfg.model} on this machine: no estimate"}
    try:
        shape = memory.model_shape(src, quantize=cfg.quantize)
        peaks = {ph: memory.estimate(shape, ph, **memory_settings(cfg, ph, plan)).total
                 for ph in run_phases(cfg)}
    except MindprintError as e:
        return {"note": f"no estimate: {e}"}
    params = shape.n_params
    tflops = cfg.estimate.tflops or (8.0 if sys.platform == "darwin" and platform.machine() == "arm64" else 0.05)
    rate = tflops * 1e12
    chars_per_token = 4.0
    per_topic = []
    ppo = cfg.ppo
    gen = ppo.max_new_tokens
    total = 0.0
    for p in plan:
        if not p["plan"]["trainable"]:
            per_topic.append({"key": p["key"], "seconds": 0.0})
            continue
        n_sft = p["counts"]["sft"]
        toks = n_sft * 150 / chars_per_token * 4  # ~600 chars per example
        t_sft = 6 * params * toks * p["plan"]["sft_epochs"] / rate
        n_q = min(p["counts"]["quiz"] or n_sft, cfg.eval.max_questions)
        # generation is memory-bound: count it at a tenth of the training efficiency
        t_eval = 2 * 10 * params * n_q * cfg.eval.max_tokens * 2 / rate
        t_ppo = ppo.steps * ppo.batch_size * (10 * 2 * params * gen
                                              + (4 + 6 * ppo.ppo_epochs) * params * (gen + 64)) / rate
        s = t_sft + t_eval + t_ppo
        total += s
        per_topic.append({"key": p["key"], "seconds": s, "sft": t_sft, "eval": t_eval, "ppo_if_run": t_ppo})
    t_reward = t_contrast = t_labels = 0.0
    if not cfg.reward.path:
        from .phases import contrast_sources, reward_halves

        # The reward model's and the judge's pairs, and the reward model's contrast pairs:
        # reward.contrast_samples base-model answers to every answer the person wrote for it,
        # sampled like PPO's rollouts.
        pairs, judge_pairs = reward_halves(cfg, dataset)
        n_contrast = cfg.reward.contrast_samples * len(contrast_sources(dataset, pairs))
        t_contrast = n_contrast * 10 * 2 * params * gen / rate
        # reward.labels.judge: an SFT policy on every trainable topic's examples, its
        # answers to the practice prompts, and at most every pair of them labelled
        n_labels = 0
        lc = cfg.reward.labels
        trained = [p for p in plan if p["plan"]["trainable"]]
        if lc.judge and trained:
            toks = sum(p["counts"]["sft"] for p in trained) * 150 / chars_per_token * 4
            n_prompts = sum(p["counts"].get("prompts") or p["counts"]["sft"] for p in trained)
            t_labels = (6 * params * toks * trained[0]["plan"]["sft_epochs"]
                        + n_prompts * lc.samples * 10 * 2 * params * gen) / rate
            n_labels = n_prompts * lc.samples * (lc.samples - 1) // 2
        t_reward = 6 * params * (len(pairs) + len(judge_pairs) + n_contrast + n_labels) * 2 * 100 * 3 / rate
    total += t_reward + t_contrast + t_labels
    return {"params": params, "base_bytes": shape.weight_bytes,
            "peak_memory_bytes": max(peaks.values()), "memory_by_phase": peaks,
            "assumed_tflops": tflops, "reward_seconds": t_reward,
            "contrast_seconds": t_contrast, "labels_seconds": t_labels, "total_seconds": total,
            "per_topic": per_topic, "final_adapter": plan_final_sizes(cfg, plan, shape),
            "note": "rough time: counts FLOPs at the assumed rate, assumes PPO runs on every topic"}


def final_adapter_sizes(cfg: PipelineConfig, plan: list[dict]) -> list[dict] | None:
    """The final adapter's rank, parameters and bytes under each merge.mode (None when the
    model's shape cannot be read here)."""
    from ..memory import model_shape

    try:
        shape = model_shape(cfg.model, quantize=cfg.quantize)
    except MindprintError:
        return None
    return plan_final_sizes(cfg, plan, shape)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def human_seconds(s: float) -> str:
    s = float(s)
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def format_plan(plan: list[dict]) -> str:
    lines = []
    for i, p in enumerate(plan, 1):
        pl = p["plan"]
        c = p["counts"]
        head = (f"{i:>3}. {p['key']}  (sft {c['sft']}, pref {c['preference']}, quiz {c['quiz']}, "
                f"distinctions {c['distinctions']})")
        lines.append(head)
        if not pl["trainable"]:
            lines.append("       SKIP: " + "; ".join(p["reasons"]))
            continue
        lines.append(f"       SFT {pl['sft_epochs']} epochs, batch {pl['batch_size']}, "
                     f"lr x{pl['lr_multiplier']:.3g}; {p.get('refine_method', 'ppo').upper()} "
                     f"if quiz < {pl['pass_threshold']:.2f}")
        for r in p["reasons"]:
            lines.append(f"       - {r}")
    return "\n".join(lines)


def format_estimate(est: dict) -> str:
    if "params" not in est:
        return est.get("note", "no estimate")
    from .merge import format_final_sizes

    text = (f"model {est['params'] / 1e6:.1f}M params, base {human_bytes(est['base_bytes'])}; "
            f"peak memory ~{human_bytes(est['peak_memory_bytes'])} ("
            + ", ".join(f"{k} {human_bytes(v)}" for k, v in est["memory_by_phase"].items())
            + f"); time ~"
            f"{human_seconds(est['total_seconds'])} (reward model "
            f"{human_seconds(est['reward_seconds'])}"
            + (f", its contrast samples {human_seconds(est['contrast_seconds'])}"
               if est.get("contrast_seconds") else "")
            + (f", the labels' SFT policy and samples {human_seconds(est['labels_seconds'])}"
               if est.get("labels_seconds") else "")
            + f") at {est['assumed_tflops']} TFLOP/s; {est['note']}")
    if est.get("final_adapter"):
        text += "\n" + format_final_sizes(est["final_adapter"])
    return text
