"""`mindprint plan`: estimate peak memory per phase before a run, from config.json only.

With --config, a pipeline YAML: each phase's settings are its section's (sft, reward.train,
ppo, grpo for grpo and rloo, dpo, ditto), read as the pipeline reads them (`pipeline.plan.memory_settings`); options override."""

from __future__ import annotations

import click

from ..errors import MindprintError


@click.command()
@click.option("--model", "-m", default=None,
              help="Base model: directory, hub id (cached) or a config.json; default: the config's `model`.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A pipeline YAML; each phase's batch size, lengths, LoRA settings are read from its section.")
@click.option("--phase", "phases", multiple=True,
              type=click.Choice(["sft", "reward", "ppo", "grpo", "rloo", "dpo", "ditto"]),
              help="Only these phases (repeatable); default all: SFT, reward and every refine method.")
@click.option("--batch", type=click.IntRange(1), default=None, help="Batch size (rows).")
@click.option("--seq-len", type=click.IntRange(1), default=None, help="Training row length in tokens.")
@click.option("--lora-rank", type=click.IntRange(1), default=None)
@click.option("--targets", default=None, help="Comma-separated LoRA target layers.")
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None, help="Quantize the base on load.")
@click.option("--grad-checkpoint/--no-grad-checkpoint", default=None)
@click.option("--max-new-tokens", type=click.IntRange(1), default=None,
              help="Rollout / sample length (PPO, GRPO, RLOO, DITTO).")
@click.option("--mini-batch", type=click.IntRange(1), default=None,
              help="PPO rows, GRPO/RLOO prompts or DPO/DITTO pairs per micro-batch.")
@click.option("--forward-batch", type=click.IntRange(1), default=None,
              help="Rows per teacher-forced pass over the rollout (DITTO: prompts per sampling call).")
@click.option("--group-size", type=click.IntRange(2), default=None,
              help="GRPO/RLOO samples per prompt.")
@click.option("--memory-gb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Judge the fit for a machine with this much RAM (GiB, e.g. 64 for a 64 GB "
                   "Mac) instead of this one; 75%% of it counts as usable.")
def plan(model, config_file, phases, batch, seq_len, lora_rank, targets, quantize, grad_checkpoint,
         max_new_tokens, mini_batch, forward_batch, group_size, memory_gb):
    """Estimate peak memory of SFT, reward training and each refine method (PPO, GRPO, RLOO,
    DPO, DITTO), and whether it fits here (or on a machine with --memory-gb of RAM)."""
    from ..memory import estimate, fmt_bytes, model_shape, plan_table, working_set_limit

    cfg = None
    if config_file:
        from ..pipeline.config import load_pipeline_config
        from ..pipeline.plan import memory_settings

        # only the sections matter here: a file without data_dir (or model) is fine
        cfg = load_pipeline_config(config_file, base={"model": model or "-", "data_dir": "-"})
        if model is None and cfg.model != "-":
            model = cfg.model
    if not model:
        raise MindprintError("no model: pass --model or set `model:` in the config")
    cli = {"batch": batch, "seq_len": seq_len, "lora_rank": lora_rank,
           "targets": tuple(t.strip() for t in targets.split(",") if t.strip()) if targets else None,
           "grad_checkpoint": grad_checkpoint, "max_new_tokens": max_new_tokens,
           "mini_batch": mini_batch, "forward_batch": forward_batch, "group_size": group_size}
    defaults = {"batch": 4, "seq_len": 512, "lora_rank": 8, "grad_checkpoint": False,
                "max_new_tokens": 128}
    q = int(quantize) if quantize else (cfg.quantize if cfg else None)
    rows = []
    shape = model_shape(model, quantize=q)
    from ..memory import PHASES
    from ..pipeline.plan import run_phases

    # with a config: the phases its run trains (its refine methods); else every phase
    for phase in phases or (run_phases(cfg) if cfg else PHASES):
        kw = {**defaults, **(memory_settings(cfg, phase) if cfg else {})}
        kw.update({k: v for k, v in cli.items() if v is not None})
        if phase in ("sft", "reward"):
            kw.pop("mini_batch", None)
            kw.pop("forward_batch", None)
        if phase not in ("grpo", "rloo"):
            kw.pop("group_size", None)
        rows.append(estimate(shape, phase, **kw))
    limit, how = working_set_limit(memory_gb)
    s = shape
    click.echo(f"model: {model} ({s.model_type}, {s.n_params / 1e6:.1f}M parameters, "
               f"{s.num_layers} layers, hidden {s.hidden}"
               + (f", {s.quantized_bits}-bit" if s.quantized_bits else "") + ")")
    click.echo(plan_table(rows, limit))
    where = f"a {memory_gb:g} GiB machine" if memory_gb is not None else "this machine"
    click.echo(f"\n{where}: {fmt_bytes(limit)} usable ({how})")
    for e in rows:
        verdict = "fits" if e.total <= limit else "does NOT fit"
        extra = f"; {'; '.join(e.notes)}" if e.notes else ""
        click.echo(f"{e.phase}: {fmt_bytes(e.total)} {verdict}{extra}")
    if any(e.total > limit for e in rows):
        levers = [] if s.quantized_bits == 4 else ["--quantize 4"]
        levers += ["--grad-checkpoint", "a smaller --batch or --seq-len"]
        click.echo("to fit: " + ", ".join(levers))
    if cfg is not None and cfg.data_dir != "-":
        click.echo("\n" + _final_adapter(cfg, model))


def _final_adapter(cfg, model: str) -> str:
    """A pipeline config: the final adapter's size under each merge.mode (its topics counted)."""
    import dataclasses

    from ..pipeline.merge import format_final_sizes
    from ..pipeline.plan import final_adapter_sizes, load_curriculum, plan_topics

    from pathlib import Path

    if not Path(cfg.data_dir).is_dir():
        # planning before the data exists is the point of a dry estimate: say so, don't fail
        return f"final adapter: data_dir {cfg.data_dir} not found here: its size is not estimated"
    if str(model) != cfg.model:
        cfg = dataclasses.replace(cfg, model=str(model))
    dataset, curriculum = load_curriculum(cfg)
    rows = final_adapter_sizes(cfg, plan_topics(cfg, dataset, curriculum))
    return format_final_sizes(rows) if rows else "final adapter: the model's shape is unknown here"
