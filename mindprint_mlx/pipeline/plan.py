"""The topic plan (shared by the dry run and the real run) and a rough time/memory estimate."""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
from pathlib import Path
from typing import Any

from ..config import to_dict
from ..errors import MindprintError
from .config import PipelineConfig, resolve_section


def _asdict(x: Any) -> dict:
    if dataclasses.is_dataclass(x):
        return to_dict(x)
    if isinstance(x, dict):
        return dict(x)
    return {k: v for k, v in vars(x).items() if not k.startswith("_")}


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
    return dataset, curriculum


def plan_topics(cfg: PipelineConfig, dataset, curriculum) -> list[dict]:
    """Every topic with its data counts, quality, adaptive decisions and their reasons."""
    from ..data import adaptive, quality

    bounds = resolve_section(cfg, "adaptive", strict=False)
    out = []
    for t in curriculum.topics:
        q = quality.topic_quality(t, dataset.persona)
        p = adaptive.decide(q, bounds) if not isinstance(bounds, dict) else adaptive.decide(q)
        plan = {k: getattr(p, k) for k in ("sft_epochs", "batch_size", "lr_multiplier",
                                           "pass_threshold", "trainable")}
        out.append({"key": t.key, "unit": t.unit, "chapter": t.chapter, "topic": t.name,
                    "rel_dir": t.rel_dir,
                    "counts": {"sft": len(t.sft), "preference": len(t.preference),
                               "quiz": len(t.quiz), "distinctions": len(t.distinctions)},
                    "quality": _jsonable(_asdict(q)),
                    "plan": plan, "reasons": list(p.reasons)})
    return out


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


# ---------------------------------------------------------------- estimate

def _model_config(model: str) -> dict | None:
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


def param_count(c: dict) -> int:
    c = c.get("text_config", c)
    H, L, V = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    nq = c.get("num_attention_heads", 1)
    nkv = c.get("num_key_value_heads", nq)
    D = c.get("head_dim") or H // nq
    inter = c.get("intermediate_size", 4 * H)
    per_layer = H * nq * D * 2 + H * nkv * D * 2 + 3 * H * inter
    emb = V * H * (1 if c.get("tie_word_embeddings", False) else 2)
    return L * per_layer + emb


def _get(obj: Any, names: tuple[str, ...], default: Any) -> Any:
    for n in names:
        v = obj.get(n) if isinstance(obj, dict) else getattr(obj, n, None)
        if v is not None:
            return v
    return default


def estimate(cfg: PipelineConfig, plan: list[dict], dataset) -> dict:
    """A rough estimate of wall time and peak memory (upper bound: PPO on every topic)."""
    mc = _model_config(cfg.model)
    if mc is None:
        return {"note": f"no config.json for {cfg.model} on this machine: no estimate"}
    params = param_count(mc)
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}.get(
        str(mc.get("torch_dtype", "bfloat16")), 2)
    q = (mc.get("quantization") or mc.get("quantization_config") or {}).get("bits")
    bits = cfg.quantize or q
    base_bytes = params * (bits / 8 * 1.125 if bits else dtype_bytes)
    sft = resolve_section(cfg, "sft", strict=False)
    ppo = resolve_section(cfg, "ppo", strict=False)
    seq = int(_get(sft, ("max_seq_length",), 512))
    bsz = int(_get(sft, ("batch_size",), 4))
    c = mc.get("text_config", mc)
    act_bytes = 16 * bsz * seq * c["hidden_size"] * c["num_hidden_layers"]
    mem = base_bytes + act_bytes + 0.5e9
    chars_per_token = 4.0
    sft_tokens = 0.0
    by_key = {}
    for p in plan:
        by_key[p["key"]] = p
    tflops = cfg.estimate.tflops or (8.0 if sys.platform == "darwin" and platform.machine() == "arm64" else 0.05)
    rate = tflops * 1e12
    per_topic = []
    ppo_steps = int(_get(ppo, ("steps", "total_steps", "num_steps"), 0))
    ppo_bsz = int(_get(ppo, ("batch_size", "rollout_batch_size"), 8))
    ppo_epochs = int(_get(ppo, ("ppo_epochs", "epochs"), 4))
    gen = int(_get(ppo, ("max_new_tokens", "response_length", "max_tokens"), cfg.estimate.ppo_gen_tokens))
    total = 0.0
    for p in plan:
        if not p["plan"]["trainable"]:
            per_topic.append({"key": p["key"], "seconds": 0.0})
            continue
        n_sft = p["counts"]["sft"]
        toks = n_sft * 150 / chars_per_token * 4  # ~600 chars per example
        sft_tokens += toks * p["plan"]["sft_epochs"]
        t_sft = 6 * params * toks * p["plan"]["sft_epochs"] / rate
        n_q = min(p["counts"]["quiz"] or n_sft, cfg.eval.max_questions)
        # generation is memory-bound: count it at a tenth of the training efficiency
        t_eval = 2 * 10 * params * n_q * cfg.eval.max_tokens * 2 / rate
        t_ppo = ppo_steps * ppo_bsz * (10 * 2 * params * gen + (4 + 6 * ppo_epochs) * params * (gen + 64)) / rate
        s = t_sft + t_eval + t_ppo
        total += s
        per_topic.append({"key": p["key"], "seconds": s, "sft": t_sft, "eval": t_eval, "ppo_if_run": t_ppo})
    pairs = len(dataset.preference) + len(dataset.distinctions)
    t_reward = 0.0 if cfg.reward.path else 6 * params * pairs * 2 * 100 * 3 / rate
    total += t_reward
    return {"params": params, "base_bytes": base_bytes, "peak_memory_bytes": mem,
            "assumed_tflops": tflops, "reward_seconds": t_reward, "total_seconds": total,
            "per_topic": per_topic, "final_adapter": final_adapter_sizes(cfg, plan),
            "note": "rough: counts FLOPs at the assumed rate, assumes PPO runs on every topic"}


def final_adapter_sizes(cfg: PipelineConfig, plan: list[dict]) -> list[dict] | None:
    """The final adapter's rank, parameters and bytes under each merge.mode (None when the
    model's shape cannot be read here)."""
    from ..memory import model_shape
    from .merge import plan_final_sizes

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
                     f"lr x{pl['lr_multiplier']:.3g}; PPO if quiz < {pl['pass_threshold']:.2f}")
        for r in p["reasons"]:
            lines.append(f"       - {r}")
    return "\n".join(lines)


def format_estimate(est: dict) -> str:
    if "params" not in est:
        return est.get("note", "no estimate")
    from .merge import format_final_sizes

    text = (f"model {est['params'] / 1e6:.1f}M params, base {human_bytes(est['base_bytes'])}; "
            f"peak memory ~{human_bytes(est['peak_memory_bytes'])}; time ~"
            f"{human_seconds(est['total_seconds'])} (reward model "
            f"{human_seconds(est['reward_seconds'])}) at {est['assumed_tflops']} TFLOP/s; {est['note']}")
    if est.get("final_adapter"):
        text += "\n" + format_final_sizes(est["final_adapter"])
    return text
