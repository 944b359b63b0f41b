"""The curriculum runner: reward model once, then per unit, per topic SFT -> quiz -> refine
(PPO) -> final quiz, then merge -> verify, and on to the next unit on the merged (frozen)
weights; at the end the final adapter and its grade.

The phases are `phases`' functions (how adapters stack: its docstring), the decisions
`decide`'s pure functions; this module sets the run up, walks the curriculum and records
how it ended.

Under `mlx.launch` every rank runs this: rank 0 holds the run directory (lock, repair,
state.json, run.json, report) and sends the others its state; they never write it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import mlx.core as mx

from ..errors import Interrupted, MindprintError
from ..stop import graceful_sigint
from . import phases
from .config import PipelineConfig, resolved_dict
from .merge import Merger
from .phases import TopicRun
from .plan import estimate, format_estimate, format_plan, load_curriculum, plan_topics
from .report import summary_table, write_metrics_csv, write_report
from .state import RunState, check_resume, data_changes, data_hashes, has_progress, write_run_json


@dataclasses.dataclass
class PipelineResult:
    run_dir: Path
    state: dict
    status: str                     # "finished" | "interrupted" | "stopped: ..." | "dry run"
    plan: list[dict]
    estimate: dict | None = None
    report: Path | None = None


def prepare(cfg: PipelineConfig, resume: bool, dry_run: bool,
            echo: Callable[[str], None]) -> phases.Run | PipelineResult:
    """The plan, and (unless a dry run) the run directory checked or created: the run's
    context, or the dry run's result."""
    run_dir = Path(cfg.run_dir)
    resolved = resolved_dict(cfg)
    dataset, curriculum = load_curriculum(cfg)
    dropped = phases.drop_quiz_repeats(dataset, curriculum)
    if any(dropped.values()):
        echo("held-out quiz: dropped training records that repeat a quiz question: "
             + ", ".join(f"{n} {k}" for k, n in dropped.items() if n))
    plan = plan_topics(cfg, dataset, curriculum)
    hashes = data_hashes(cfg.data_dir)
    if dry_run:
        import yaml

        est = estimate(cfg, plan, dataset)
        echo("# resolved config\n" + yaml.safe_dump(resolved, sort_keys=False))
        echo(f"# topic plan ({len(plan)} topics, curriculum order)\n" + format_plan(plan))
        echo("\n# estimate\n" + format_estimate(est))
        echo("\ndry run: nothing trained, nothing written.")
        return PipelineResult(run_dir, {}, "dry run", plan, est)
    from .. import distributed as dist

    def open_state() -> dict:      # rank 0: the run directory is its own
        nonlocal resume, state
        state_file = run_dir / "state.json"
        if state_file.exists() and not resume and has_progress(run_dir):
            raise MindprintError(f"{run_dir} already holds a run (state.json); pass --resume to "
                                 "continue it, or choose another run_dir")
        if resume and state_file.exists():
            check_resume(run_dir, resolved, hashes)
            if not (run_dir / "run.json").exists():
                write_run_json(run_dir, resolved, cfg.seed, hashes, plan)
        else:
            resume = False
            run_dir.mkdir(parents=True, exist_ok=True)
            write_run_json(run_dir, resolved, cfg.seed, hashes, plan)
        state = RunState.load(run_dir)
        state.data["plan"] = plan
        state.data["quiz_repeats_dropped"] = dropped
        state.data.pop("stopped", None)
        state.save()
        return {"resume": resume, "hashes": hashes,
                "data": state.without_missing() if dist.size() > 1 else None}

    def same_data() -> None:        # every rank trains on the data rank 0 recorded
        if opened["hashes"] != hashes:
            raise MindprintError(f"{cfg.data_dir}: the data differ from rank 0's ("
                                 + "; ".join(data_changes(opened["hashes"], hashes)[:4])
                                 + "); copy the same data to every machine")

    state: RunState | None = None
    opened = dist.on_main(open_state)
    dist.check_all(same_data)
    if state is None:               # another rank: rank 0's record, in memory only
        state = RunState(run_dir, opened["data"], writer=False)
        echo = _quiet
    return phases.Run(cfg, state, dataset, curriculum, plan, resolved, echo, opened["resume"])


def _quiet(line: str) -> None:
    """The other ranks' echo: rank 0 alone prints."""


def load_model(run: phases.Run) -> None:
    from ..models import load

    cfg = run.cfg
    mx.random.seed(cfg.seed)
    run.echo(f"loading {cfg.model}" + (f" ({cfg.quantize}-bit)" if cfg.quantize else ""))
    run.model, run.tok = load(cfg.model, quantize=cfg.quantize)


def check_lora(run: phases.Run) -> None:
    """Every section's LoRA layers exist in this model: fail before anything trains."""
    from ..guards import check_lora_fits

    cfg = run.cfg
    from .refine import lora_sections

    sections = [("sft", cfg.sft)] + (lora_sections(cfg) if cfg.run_ppo else []) + \
        ([] if cfg.reward.path else [("reward.train", cfg.reward.train)])
    for name, sec in sections:
        check_lora_fits(run.model, name, sec.lora_targets, sec.num_layers)


def walk(run: phases.Run) -> str:
    """Reward model once -> per unit: per topic the phases -> merge -> verify -> final adapter."""
    check_lora(run)
    run.merger = Merger(run)        # merge.mode: concat | svd | fold_into_base (merge.py)
    run.merger.check()
    phases.reward_models(run)
    stop = phases.chance_stop(run)
    if stop:
        run.echo("STOPPED: " + stop)
        return "stopped: " + stop
    phases.check_stop()
    st, plans = run.state, {p["key"]: p for p in run.plan}
    units = list(dict.fromkeys(t.unit for t in run.curriculum.topics))
    prior: list[str] = []          # the merged adapters of the units before, frozen
    index = 0
    for ui, unit in enumerate(units):
        uname = f"u{ui}"
        topics = [t for t in run.curriculum.topics if t.unit == unit]
        if st.unit_done(unit):
            from ..models.adapters import load_adapter

            run.trained += [t for t in topics if st.phase(t.key, "final") is not None]
            if st.data["units"][unit].get("merged"):
                load_adapter(run.model, phases.read_dir(run, st.data["units"][unit]["merged"]),
                             name=uname)
                prior.append(uname)
            prior = run.merger.resumed_unit(uname, prior, st.data["units"][unit])
            index += len(topics)
            continue
        acc = None                 # the unit's topics so far, folded into one adapter
        for t in topics:
            index += 1
            if st.phase(t.key, "final") is not None or st.phase(t.key, "skip") is not None:
                names = phases.restore_topic(run, t.key)
            else:
                names = phases.run_topic(run, TopicRun(index, t, plans[t.key],
                                                       prior + ([acc] if acc else [])))
            acc = phases.fold(run, acc, uname, names)
            if st.phase(t.key, "final") is not None:
                if t not in run.trained:
                    run.trained.append(t)
                phases.retention_row(run, t.key, prior + [acc])
            phases.check_stop()
        merged = phases.merge_unit(run, unit, uname, topics, acc, prior)
        if merged:
            prior.append(merged)
            prior = run.merger.after_unit(ui, unit, uname, phases.merged_dir(run, unit), prior,
                                          st.unit(unit), ui == len(units) - 1)
        regression = phases.verify(run, unit, topics, list(prior), index)
        if regression and run.cfg.verify.stop_on_regression:
            return "stopped: " + regression
        phases.check_stop()
    if prior:
        phases.ship(run, prior, units)
    return "finished"


def run_pipeline(cfg: PipelineConfig, resume: bool = False, dry_run: bool = False,
                 echo: Callable[[str], None] | None = None) -> PipelineResult:
    """Run (or continue, or only plan) the curriculum of `cfg`; see the module docstring.

    A run holds the run directory's lock (`runlock`) for its life; resuming first repairs
    what a killed run left (`io.repair_tree`). Under `mlx.launch` rank 0 alone does both
    (the others never touch run_dir); every rank must see the model and the data."""
    from .. import distributed as dist
    from ..guards import check_model_ref
    from ..io import repair_tree
    from ..runlock import acquire

    echo = echo or (lambda s: print(s, file=sys.stderr, flush=True))
    if not dist.is_main():
        echo = _quiet
    # before run_dir is touched: a typo leaves nothing behind
    dist.check_all(lambda: check_model_ref(cfg.model))
    if dry_run:
        return _run_pipeline(cfg, resume, dry_run, echo)

    def lock():
        held = acquire(cfg.run_dir, note=echo)
        try:
            if resume:
                for line in repair_tree(cfg.run_dir):
                    echo(f"resume: {line}")
        except BaseException:
            held.release()
            raise
        return held
    held = dist.on_main(lock, share=False)
    with held if held is not None else contextlib.nullcontext():
        return _run_pipeline(cfg, resume, dry_run, echo)


def _run_pipeline(cfg: PipelineConfig, resume: bool, dry_run: bool,
                  echo: Callable[[str], None]) -> PipelineResult:
    from .. import distributed as dist

    run = prepare(cfg, resume, dry_run, echo)
    if isinstance(run, PipelineResult):
        return run
    t0 = time.time()
    status = "interrupted"
    with graceful_sigint():
        try:
            load_model(run)
            status = walk(run)
        except Interrupted:   # a stop request: between phases, or a trainer mid-phase (checkpointed)
            status = "interrupted"
            echo("interrupted: state saved; continue with --resume")
        except BaseException as e:
            status = f"failed: {type(e).__name__}: {e}".strip()
            raise
        finally:
            st = run.state
            st.data["finished"] = status == "finished"
            if status != "finished":
                st.data["stopped"] = status
            st.data.setdefault("wall_seconds", 0.0)
            st.data["wall_seconds"] += time.time() - t0
            st.save()
            report = None
            if dist.is_main():          # no collective here: a failed rank must not wait
                report = write_report(run.run_dir, st.data, run.resolved)
                write_metrics_csv(run.run_dir)
    if status == "finished" and dist.is_main():
        shutil.rmtree(run.work, ignore_errors=True)
        try:
            from ..plots import plot_run

            plot_run(run.run_dir)
        except MindprintError as e:
            echo(f"plots: {e}")
    return PipelineResult(run.run_dir, run.state.data, status, run.plan, report=report)


def summary(result: PipelineResult) -> str:
    return summary_table(result.state)
