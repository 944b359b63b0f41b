"""`mindprint demo`: the whole pipeline, offline, on a tiny model and the demo curriculum.

The settings are embedded here (the package may be installed without the repository);
configs/demo.yaml holds the same values for reading and editing (a test keeps them equal).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from ..errors import MindprintError

# Tuned so the demo finishes in about two minutes on two CPU cores, the reward model
# separates chosen from rejected, and PPO runs (and raises the mean reward) on topics
# whose quiz score is below the threshold.
DEMO_CONFIG: dict = {
    "seed": 0,
    "reward": {"train": {"lora_r": 4, "lora_alpha": 8.0, "epochs": 3, "batch_size": 8,
                         "max_len": 96, "lr": 2e-3, "patience": 2, "log_every": 2,
                         "include_distinctions": True, "compile": False}},
    "sft": {"lora_r": 8, "lora_alpha": 16.0, "lr": 3e-3, "max_len": 96, "save_every": 100,
            "compile": False},
    "ppo": {"steps": 16, "batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 2,
            "learning_rate": 6e-3, "max_new_tokens": 24, "init_kl_coef": 0.01,
            "adap_kl_ctrl": False, "lora_rank": 4, "lora_alpha": 8.0, "save_every": 8,
            "progress": False},
    "adaptive": {"min_epochs": 3, "max_epochs": 3, "min_pass_threshold": 0.45,
                 "max_pass_threshold": 0.45},
    "eval": {"max_tokens": 24, "max_questions": 3, "reward_samples": 2},
    "verify": {"tolerance": 0.1, "stop_on_regression": False},
}

# --fast: one unit, two topics, fewer PPO steps (a smoke test of the whole path).
FAST_OVERRIDES: dict = {
    "units": ["unit-1-foundations"],
    "topics": ["cycle-phases", "drivers-of-cycles"],
    "ppo": {"steps": 8},
}

HONEST = ("Note: the demo model is tiny and random (about a million parameters, trained for "
          "seconds); its text is not meant to be good, and its reward model is easy to fool (PPO "
          "finds out how: watch the answers drift towards what it likes). The demo shows the "
          "machinery, every phase, file and report of a real run, not the quality of one.")


def demo_config(out: str | Path, model: str | Path, fast: bool = False):
    from ..config import deep_merge
    from ..demo import DEMO_CURRICULUM_DIR
    from .config import load_pipeline_config

    base = deep_merge(DEMO_CONFIG, FAST_OVERRIDES) if fast else dict(DEMO_CONFIG)
    base = deep_merge(base, {"model": str(model), "data_dir": str(DEMO_CURRICULUM_DIR),
                             "run_dir": str(out)})
    return load_pipeline_config(None, base=base)


def _clear_previous(out: Path) -> None:
    """Remove a previous demo run in `out`; refuse to touch anything else."""
    if not out.exists():
        return
    if not out.is_dir():
        raise MindprintError(f"--out {out} is a file")
    if not any(out.iterdir()):
        return
    run = out / "run.json"
    try:
        cfg = json.loads(run.read_text())["config"] if run.is_file() else None
    except (json.JSONDecodeError, KeyError):
        cfg = None
    if not cfg or not str(cfg.get("data_dir", "")).endswith("demo/curriculum"):
        raise MindprintError(f"--out {out} is not empty and is not a previous demo run; "
                             "choose another directory")
    shutil.rmtree(out)


def run_demo(out: str | Path = "mindprint-demo", fast: bool = False,
             echo: Callable[[str], None] | None = None, cache_dir: str | Path | None = None) -> dict:
    """Build/reuse the tiny model, run the pipeline, export PEFT; returns what was made."""
    from ..data import curriculum_texts
    from ..demo import DEMO_CURRICULUM_DIR
    from ..models.tiny import ensure_demo_model
    from .runner import run_pipeline, summary

    echo = echo or (lambda s: print(s, file=sys.stderr, flush=True))
    t0 = time.time()
    out = Path(out)
    _clear_previous(out)
    echo("mindprint demo: tiny model + demo curriculum, offline")
    model = ensure_demo_model(cache_dir, texts=curriculum_texts(DEMO_CURRICULUM_DIR))
    echo(f"model: {model} (built once, cached)")
    cfg = demo_config(out, model, fast)
    result = run_pipeline(cfg, echo=echo)
    made = {"run_dir": str(out), "status": result.status, "model": str(model)}
    final = result.state.get("final_adapter")
    if final and result.status == "finished":
        try:
            from ..export.peft import export_peft
        except ImportError:
            export_peft = None
        if export_peft is not None:
            res = export_peft(out / final, out / "peft_adapter", model=str(model))
            made["peft_adapter"] = str(out / "peft_adapter")
            echo(f"PEFT export: {out / 'peft_adapter'}" + (f" ({res})" if not hasattr(res, "__dict__") else ""))
    made["seconds"] = time.time() - t0
    made["summary"] = summary(result)
    made["parts"], made["example"] = _parts_and_example(result.state)
    return made


def _parts_and_example(state: dict) -> tuple[dict, dict | None]:
    """Mean quiz parts of the final answers over the topics, and one question answered."""
    sums: dict[str, list[float]] = {}
    example = None
    for rec in state.get("topics", {}).values():
        final = rec.get("phases", {}).get("final") or {}
        for k, v in (final.get("parts") or {}).items():
            sums.setdefault(k, []).append(v)
        src = rec.get("phases", {}).get("final", {}).get("items") or \
            rec.get("phases", {}).get("quiz", {}).get("items")
        if example is None and src:
            example = src[0]
    return {k: sum(v) / len(v) for k, v in sums.items()}, example


def parts_text(made: dict) -> str:
    lines = []
    if made.get("parts"):
        lines.append("Quiz parts, mean over topics: " + ", ".join(
            f"{k} {v:.2f}" for k, v in made["parts"].items()))
    ex = made.get("example")
    if ex:
        lines += [f"Example question: {ex['question']}", f"  reference:  {ex['reference']}",
                  f"  tiny model: {ex['answer']!r}"]
    return "\n".join(lines)


def where_text(made: dict) -> str:
    run = Path(made["run_dir"])
    lines = [f"Everything is in {run}/:",
             f"  report.md            per-topic scores, PPO, adaptive decisions, pass rate",
             f"  state.json, run.json what is done; config, versions, data hashes",
             f"  reward_model/        the reward model (LoRA + head)",
             f"  adapters/            per topic: sft_adapter/, ppo_adapter/ (mlx-lm format)",
             f"  merged_adapters/     one adapter per unit",
             f"  final_adapter/       the whole curriculum in one adapter",
             f"  metrics/, plots/     JSONL + CSV metrics, PNG curves"]
    if made.get("peft_adapter"):
        lines.append(f"  peft_adapter/        the final adapter for PEFT/transformers")
    lines.append(f"Try: mindprint generate -m {made['model']} -a {run}/final_adapter -p "
                 "\"What is a market cycle?\" --compare")
    return "\n".join(lines)
