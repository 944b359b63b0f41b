"""`mindprint data`: validate a curriculum data directory and report its quality."""

from __future__ import annotations

import click


def _files(sft, preference, quiz, distinctions, persona, prompts=None):
    from ..data import DataFiles

    kw = {k: v for k, v in (("sft", sft), ("preference", preference), ("quiz", quiz),
                            ("distinctions", distinctions), ("persona", persona),
                            ("prompts", prompts)) if v}
    return DataFiles(**kw)


def _file_options(f):
    for name, default in reversed((("sft", "sft_data.jsonl"), ("preference", "preference_data.jsonl"),
                                   ("quiz", "quiz_data.jsonl"),
                                   ("distinctions", "critical_distinctions.jsonl"),
                                   ("prompts", "prompt_data.jsonl"),
                                   ("persona", "persona.json"))):
        f = click.option(f"--{name}-file", name, default=None, metavar="NAME",
                         help=f"File name inside DIR (default {default}).")(f)
    f = click.option("--topic", "topics", multiple=True, help="Only this topic (repeatable).")(f)
    f = click.option("--unit", "units", multiple=True, help="Only this unit (repeatable).")(f)
    return f


def _load(directory, units, topics, files):
    from ..data import build_curriculum, load_data_dir

    ds = load_data_dir(directory, files)
    return build_curriculum(ds, units=list(units) or None, topics=list(topics) or None)


@click.group("data")
def data() -> None:
    """Check and report on curriculum data (JSONL files in a directory)."""


@data.command("check", short_help="Validate a data directory; exit 1 listing every problem.")
@click.argument("directory", type=click.Path(file_okay=True, dir_okay=True))
@click.option("--strict", is_flag=True, help="Treat warnings (unknown keys, duplicates) as errors.")
@_file_options
def check(directory, strict, units, topics, sft, preference, quiz, distinctions, prompts, persona):
    """Validate DIR: exit 1 listing every problem (file:line: what is wrong), else a summary."""
    from ..data import DataError

    try:
        cur = _load(directory, units, topics, _files(sft, preference, quiz, distinctions, persona,
                                                     prompts))
    except DataError as e:
        errs, warns = e.errors, e.warnings
        for p in errs + warns:
            click.echo(str(p))
        click.secho(f"{len(errs)} error{'s' if len(errs) != 1 else ''}, {len(warns)} "
                    f"warning{'s' if len(warns) != 1 else ''}: data is invalid", fg="red", err=True)
        click.get_current_context().exit(1)
    ds = cur.dataset
    for w in ds.warnings:
        click.echo(str(w))
    s = ds.summary()
    click.echo(f"ok: {len(cur.units)} units, {sum(len(u.chapters) for u in cur.units)} chapters, "
               f"{len(cur.topics)} topics; {s['sft']} SFT, {s['preference']} preference, "
               f"{s['quiz']} quiz, {s['distinctions']} distinctions, {s['prompts']} prompts; "
               f"{len(ds.persona.voice_markers)} voice markers; {len(ds.warnings)} warnings")
    for t in cur.topics:
        click.echo(f"  {t.key}: {len(t.sft)} SFT, {len(t.preference)} pref, {len(t.quiz)} quiz, "
                   f"{len(t.distinctions)} dist" + (f", {len(t.prompts)} prompts" if t.prompts else ""))
    if strict and ds.warnings:
        click.secho(f"--strict: {len(ds.warnings)} warnings count as errors", fg="red", err=True)
        click.get_current_context().exit(1)


@data.command("report", short_help="Write a markdown data-quality report with adaptive plans.")
@click.argument("directory", type=click.Path(file_okay=True, dir_okay=True))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Markdown file to write (atomically).")
@click.option("--bounds", "bounds_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML file with AdaptiveBounds.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a bound, e.g. --set max_epochs=4.")
@_file_options
def report(directory, output, bounds_path, overrides, units, topics, sft, preference, quiz,
           distinctions, prompts, persona):
    """Write a markdown quality report for DIR: per-topic counts, lengths, voice-marker
    density, preference quality, weak-topic flags, recommendations and adaptive plans."""
    from ..data import DataError
    from ..data.adaptive import load_bounds
    from ..data.quality import quality_report, render_markdown
    from ..io import atomic_write_text

    bounds = load_bounds(bounds_path, list(overrides) or None)
    try:
        cur = _load(directory, units, topics, _files(sft, preference, quiz, distinctions, persona,
                                                     prompts))
    except DataError as e:
        for p in e.errors + e.warnings:
            click.echo(str(p))
        click.secho(f"{len(e.errors)} errors: no report written (fix the data, see "
                    f"`mindprint data check`)", fg="red", err=True)
        click.get_current_context().exit(1)
    rep = quality_report(cur, bounds)
    atomic_write_text(output, render_markdown(rep))
    s = rep.summary
    click.echo(f"wrote {output}: {s['topics']} topics, {s['weak_topics']} weak, "
               f"{s['untrainable_topics']} untrainable")
