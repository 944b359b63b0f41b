"""`mindprint plan`: estimate peak memory per phase before a run, from config.json only."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import MindprintError

# Config keys the planner understands (first match wins), top level or under a phase's
# section (`sft:`, `reward:`, `ppo:`), which then overrides the top level for that phase.
_KEYS = {
    "batch": ("batch_size", "batch"),
    "seq_len": ("seq_len", "max_seq_length"),
    "lora_rank": ("lora_rank", "lora_rank", "rank", "r"),
    "targets": ("lora_targets", "targets", "target_modules"),
    "quantize": ("quantize", "quantize_bits", "bits"),
    "grad_checkpoint": ("grad_checkpoint", "gradient_checkpointing"),
    "max_new_tokens": ("max_new_tokens", "response_length"),
    "mini_batch": ("mini_batch_size",),
    "forward_batch": ("forward_batch_size",),
}


def _find(section: dict, names: tuple[str, ...], depth: int = 2):
    """The first of `names` in `section`, or in its nested mappings (breadth first)."""
    for n in names:
        if n in section and section[n] is not None:
            return section[n]
    if depth > 0:
        for v in section.values():      # e.g. reward: {train: {lora_rank: 8}}
            if isinstance(v, dict):
                found = _find(v, names, depth - 1)
                if found is not None:
                    return found
    return None


def _read_yaml(path: Path) -> dict:
    import yaml

    from ..config import DuplicateYAMLKey, yaml_load_strict

    try:
        data = yaml_load_strict(path.read_text(encoding="utf-8")) or {}
    except DuplicateYAMLKey as e:
        raise MindprintError(f"{path}:{e.line}: duplicate key {e.key!r}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise MindprintError(f"{path}: cannot read YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise MindprintError(f"{path}: expected a mapping at the top level")
    return data


def settings_from_config(data: dict, phase: str) -> dict:
    """Planner keyword arguments for `phase` from a (pipeline/trainer) config mapping."""
    out = {}
    sec = data.get(phase) if isinstance(data.get(phase), dict) else {}
    for key, names in _KEYS.items():
        v = _find(sec, names) if sec else None
        if v is None:
            v = _find({k: x for k, x in data.items() if k not in ("sft", "reward", "ppo")}, names,
                      depth=0)
        if v is not None:
            out[key] = v
    return out


@click.command()
@click.option("--model", "-m", default=None,
              help="Base model: directory, hub id (cached) or a config.json; default: the config's `model`.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A pipeline/trainer YAML; batch size, lengths, LoRA rank etc. are read from it.")
@click.option("--phase", "phases", multiple=True, type=click.Choice(["sft", "reward", "ppo"]),
              help="Only these phases (repeatable); default all.")
@click.option("--batch", type=click.IntRange(1), default=None, help="Batch size (rows).")
@click.option("--seq-len", type=click.IntRange(1), default=None, help="Training row length in tokens.")
@click.option("--lora-rank", type=click.IntRange(1), default=None)
@click.option("--targets", default=None, help="Comma-separated LoRA target layers.")
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None, help="Quantize the base on load.")
@click.option("--grad-checkpoint/--no-grad-checkpoint", default=None)
@click.option("--max-new-tokens", type=click.IntRange(1), default=None, help="PPO rollout length.")
@click.option("--mini-batch", type=click.IntRange(1), default=None, help="PPO rows per optimizer minibatch.")
@click.option("--forward-batch", type=click.IntRange(1), default=None,
              help="PPO rows per teacher-forced pass over the rollout.")
def plan(model, config_file, phases, batch, seq_len, lora_rank, targets, quantize, grad_checkpoint,
         max_new_tokens, mini_batch, forward_batch):
    """Estimate peak memory of SFT, reward training and PPO, and whether it fits here."""
    from ..memory import estimate, fmt_bytes, model_shape, plan_table, working_set_limit

    data = _read_yaml(Path(config_file)) if config_file else {}
    pipe = _pipeline_config(Path(config_file)) if config_file and data.get("data_dir") else None
    if model is None and pipe is not None:
        model = pipe.model              # `model: demo` resolved to the demo model's directory
    if model is None:
        model = data.get("model") or (data.get("base") if isinstance(data.get("base"), str) else None)
        if isinstance(model, dict):
            model = model.get("path") or model.get("name")
    if not model:
        raise MindprintError("no model: pass --model or set `model:` in the config")
    cli = {"batch": batch, "seq_len": seq_len, "lora_rank": lora_rank,
           "targets": tuple(t.strip() for t in targets.split(",") if t.strip()) if targets else None,
           "quantize": int(quantize) if quantize else None, "grad_checkpoint": grad_checkpoint,
           "max_new_tokens": max_new_tokens, "mini_batch": mini_batch, "forward_batch": forward_batch}
    defaults = {"batch": 4, "seq_len": 512, "lora_rank": 8, "quantize": None,
                "grad_checkpoint": False, "max_new_tokens": 128}
    rows = []
    shapes = {}
    for phase in phases or ("sft", "reward", "ppo"):
        kw = dict(defaults)
        kw.update(settings_from_config(data, phase))
        kw.update({k: v for k, v in cli.items() if v is not None})
        if isinstance(kw.get("targets"), str):
            kw["targets"] = tuple(t.strip() for t in kw["targets"].split(","))
        if kw.get("quantize") in ("none", "None", 0, False):
            kw["quantize"] = None
        if phase != "ppo":
            kw.pop("mini_batch", None)
            kw.pop("forward_batch", None)
        for k in ("batch", "seq_len", "lora_rank", "max_new_tokens", "mini_batch", "forward_batch"):
            if k not in kw:
                continue
            try:
                kw[k] = int(kw[k])
            except (TypeError, ValueError):
                raise MindprintError(f"{config_file or 'options'}: {k} must be an integer, "
                                     f"got {kw[k]!r}") from None
        q = int(kw["quantize"]) if kw.get("quantize") else None
        if q not in shapes:
            shapes[q] = model_shape(model, quantize=q)
        kw.pop("quantize")
        rows.append(estimate(shapes[q], phase, **kw))
    limit, how = working_set_limit()
    s = next(iter(shapes.values()))
    click.echo(f"model: {model} ({s.model_type}, {s.n_params / 1e6:.1f}M parameters, "
               f"{s.num_layers} layers, hidden {s.hidden}"
               + (f", {s.quantized_bits}-bit" if s.quantized_bits else "") + ")")
    click.echo(plan_table(rows, limit))
    click.echo(f"\nthis machine: {fmt_bytes(limit)} usable ({how})")
    for e in rows:
        verdict = "fits" if e.total <= limit else "does NOT fit"
        extra = f"; {'; '.join(e.notes)}" if e.notes else ""
        click.echo(f"{e.phase}: {fmt_bytes(e.total)} {verdict}{extra}")
    if any(e.total > limit for e in rows):
        levers = [] if s.quantized_bits == 4 else ["--quantize 4"]
        levers += ["--grad-checkpoint", "a smaller --batch or --seq-len"]
        click.echo("to fit: " + ", ".join(levers))
    if pipe is not None:
        click.echo("\n" + _final_adapter(pipe, model))


def _pipeline_config(config_file: Path):
    """The file as a pipeline config, or None when it is some other (trainer) config."""
    from ..config import ConfigError
    from ..pipeline import load_pipeline_config

    try:
        return load_pipeline_config(config_file)
    except ConfigError:
        return None


def _final_adapter(cfg, model: str) -> str:
    """A pipeline config: the final adapter's size under each merge.mode (its topics counted)."""
    import dataclasses

    from ..pipeline.merge import format_final_sizes
    from ..pipeline.plan import final_adapter_sizes, load_curriculum, plan_topics

    if str(model) != cfg.model:
        cfg = dataclasses.replace(cfg, model=str(model))
    dataset, curriculum = load_curriculum(cfg)
    rows = final_adapter_sizes(cfg, plan_topics(cfg, dataset, curriculum))
    return format_final_sizes(rows) if rows else "final adapter: the model's shape is unknown here"
