"""`mindprint demo`: the whole pipeline, offline, on a tiny model, in a couple of minutes."""

from __future__ import annotations

import click


@click.command("demo")
@click.option("--out", "-o", default="mindprint-demo", show_default=True,
              type=click.Path(file_okay=False), help="Run directory (a previous demo run there is replaced).")
@click.option("--fast", is_flag=True, help="Two topics of the first unit: a quick smoke test.")
def demo(out, fast):
    """Run the whole pipeline on a tiny model and the demo curriculum (no downloads)."""
    from ..pipeline.demo import HONEST, parts_text, run_demo, where_text

    made = run_demo(out, fast=fast, echo=lambda s: click.echo(s, err=True))
    click.echo()
    if parts_text(made):
        click.echo(parts_text(made))
        click.echo()
    click.echo(made["summary"])
    click.echo()
    click.echo(where_text(made))
    click.echo(f"\nstatus: {made['status']}; {made['seconds']:.0f} s")
    click.echo(HONEST)
    if made["status"] != "finished":
        raise SystemExit(1)
