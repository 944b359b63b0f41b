"""The pipeline's decisions, each a pure function of numbers (tested in tests/test_decide.py).

- the adaptive plan of a topic (`topic_plan`) and the SFT settings it gives (`topic_sft_config`);
- whether the refine method (PPO, ...) refines a topic, or the reason not (`ppo_skip_reason`);
- whether a quiz score passes (`passed`);
- whether a unit's merge cost a topic more than the tolerance (`verify_row`, `regression_message`);
- whether the run stops before PPO because the reward model is at chance (`chance_stop`);
- whether the refine method's training-batch score rose (`score_trend`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

from ..config import to_dict
from ..data.adaptive import AdaptiveBounds, decide
from ..guards import reward_at_chance
from ..train.sft import SFTConfig


def topic_plan(topic: Any, quality: Any, bounds: AdaptiveBounds) -> dict:
    """A topic's row of the run plan: its data counts, quality, the adaptive decisions
    (`data.adaptive.decide`) and their reasons, as plain JSON values."""
    p = decide(quality, bounds)
    return {"key": topic.key, "unit": topic.unit, "chapter": topic.chapter, "topic": topic.name,
            "rel_dir": topic.rel_dir,
            "counts": {"sft": len(topic.sft), "preference": len(topic.preference),
                       "quiz": len(topic.quiz), "distinctions": len(topic.distinctions),
                       "prompts": len(topic.prompts)},
            "quality": json.loads(json.dumps(to_dict(quality), default=str)),
            "plan": {"sft_epochs": p.sft_epochs, "batch_size": p.batch_size,
                     "lr_multiplier": p.lr_multiplier, "pass_threshold": p.pass_threshold,
                     "trainable": p.trainable},
            "reasons": list(p.reasons)}


def trainer_seed(section_seed: int, run_seed: int) -> int:
    """The seed a trainer of the run gets: its section's own seed offset by the run's, so
    run seed 0 keeps every section's seed as written and another run seed changes every
    trainer's data order, LoRA init and sampling (not only the pipeline's own splits)."""
    return int(section_seed) + int(run_seed)


def topic_sft_config(sft: SFTConfig, plan: dict, run_seed: int = 0) -> SFTConfig:
    """The run's SFT settings with a topic's plan applied: its epochs and batch size, the
    learning rate times its multiplier, and the seed offset by the run's (`trainer_seed`)."""
    return dataclasses.replace(sft, epochs=plan["sft_epochs"], batch_size=plan["batch_size"],
                               learning_rate=sft.learning_rate * plan["lr_multiplier"],
                               seed=trainer_seed(sft.seed, run_seed))


def ppo_skip_reason(score: float, threshold: float, run_ppo: bool, n_prompts: int,
                    what: str = "prompts") -> str | None:
    """Why the refine method (PPO, GRPO, RLOO, DPO, DITTO) does not refine a topic whose quiz
    after SFT scored `score`, or None when it does: it runs only below the pass threshold,
    when enabled (`run_ppo`) and with something to learn from (`n_prompts` of `what`:
    prompts, preference pairs, demonstrations)."""
    if not run_ppo:
        return "run_ppo is false"
    if score >= threshold:
        return f"quiz {score:.3f} >= threshold {threshold:.2f}"
    if n_prompts == 0:
        return f"no {what}"
    return None


def passed(score: float, threshold: float) -> bool:
    """A quiz score passes at or above the topic's threshold."""
    return score >= threshold


def verify_row(key: str, final: float, merged: float, tolerance: float,
               parts: dict | None = None) -> dict:
    """A topic's line of a unit's verification: its final quiz score before the merge, the
    score with the merged adapter, the drop, and whether the drop exceeds the tolerance."""
    drop = final - merged
    return {"key": key, "final": final, "merged": merged, "drop": drop, "parts": parts or {},
            "regression": drop > tolerance}


def regression_message(unit: str, rows: Sequence[dict], tolerance: float) -> str | None:
    """What the run reports when a unit's merge made topics regress; None when none did."""
    bad = [v for v in rows if v["regression"]]
    if not bad:
        return None
    return (f"regression after merging unit {unit}: "
            + ", ".join(f"{v['key']} dropped {v['drop']:.3f}" for v in bad)
            + f" (tolerance {tolerance})")


def chance_stop(run_ppo: bool, reused: bool, continue_at_chance: bool,
                val_accuracy: float | None) -> str | None:
    """The reason to stop before PPO when the trained reward model is no better than chance
    (PPO on it would optimise noise), or None: not when PPO is off, the reward model was
    given (reused) or the user said to go on."""
    if not run_ppo or reused or continue_at_chance or not reward_at_chance(val_accuracy):
        return None
    return (f"the reward model's validation accuracy is {val_accuracy} (chance: 0.5), so PPO "
            "would optimise noise; add preference pairs or train it longer, or set "
            "reward.continue_at_chance=true to go on anyway")


def score_trend(history: list[dict], n: int = 3, key: str = "objective/scores") -> dict:
    """Mean training-batch score (`key`: the method's) of the first `n` and the last `n`
    steps of a refine method."""
    xs = [float(h[key]) for h in history if key in h]
    if not xs:
        return {"first": None, "last": None, "rises": None}
    first, last = sum(xs[:n]) / len(xs[:n]), sum(xs[-n:]) / len(xs[-n:])
    return {"first": first, "last": last, "rises": last > first}
