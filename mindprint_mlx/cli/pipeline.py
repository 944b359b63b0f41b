"""`mindprint pipeline run CONFIG`: the whole curriculum, resumable; `status RUN_DIR`."""

from __future__ import annotations

import json
from pathlib import Path

import click


def _split(values) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


@click.group("pipeline")
def pipeline() -> None:
    """The curriculum pipeline: reward model, per-topic SFT -> quiz -> PPO, unit merges."""


@pipeline.command("run")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--resume", is_flag=True, help="Continue the run in run_dir, skipping finished phases.")
@click.option("--dry-run", is_flag=True, help="Print the resolved config, topic plan and estimate; train nothing.")
@click.option("--units", multiple=True, help="Only these units (repeat or comma-separate).")
@click.option("--topics", multiple=True, help="Only these topics (repeat or comma-separate).")
@click.option("--run-dir", default=None, help="Override run_dir.")
@click.option("--set", "-s", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. -s ppo.steps=20 (repeatable).")
def run(config, resume, dry_run, units, topics, run_dir, overrides):
    """Run the curriculum described by CONFIG (YAML; see configs/pipeline.yaml)."""
    from ..config import parse_overrides, deep_merge
    from ..pipeline import load_pipeline_config, run_pipeline, summary

    extra = parse_overrides(overrides)
    if units:
        extra = deep_merge(extra, {"units": _split(units)})
    if topics:
        extra = deep_merge(extra, {"topics": _split(topics)})
    if run_dir:
        extra = deep_merge(extra, {"run_dir": run_dir})
    cfg = load_pipeline_config(config, extra)
    result = run_pipeline(cfg, resume=resume, dry_run=dry_run,
                          echo=lambda s: click.echo(s, err=not dry_run))
    if dry_run:
        return
    click.echo(summary(result))
    click.echo(f"\nrun directory: {result.run_dir}  (report.md, state.json, adapters/, "
               "merged_adapters/, metrics/, plots/)")
    if result.status != "finished":
        click.echo(f"status: {result.status}; continue with: mindprint pipeline run {config} --resume")
        raise SystemExit(130 if result.status == "interrupted" else 1)


@pipeline.command("status")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print state.json.")
def status(run_dir, as_json):
    """Show how far the run in RUN_DIR got."""
    from ..errors import MindprintError
    from ..pipeline.report import summary_table
    from ..pipeline.state import read_state_file

    f = Path(run_dir) / "state.json"
    if not f.is_file():
        raise MindprintError(f"{run_dir}: no state.json (not a run directory)")
    state = read_state_file(f)
    if as_json:
        click.echo(json.dumps(state, indent=2))
        return
    click.echo(summary_table(state))
    click.echo(f"status: {'finished' if state.get('finished') else state.get('stopped') or 'in progress'}")
