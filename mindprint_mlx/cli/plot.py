"""`mindprint plot RUN_DIR`: PNG training curves from a run's metrics."""

from __future__ import annotations

import click


@click.command("plot")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def plot(run_dir):
    """Write RUN_DIR/plots/*.png (loss, learning rate, mean reward, KL); needs matplotlib."""
    from ..plots import plot_run

    for p in plot_run(run_dir):
        click.echo(str(p))
