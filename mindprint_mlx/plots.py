"""Training curves of a run as PNG files: loss, learning rate, mean reward, KL.

`plot_run(run_dir)` reads every metrics/*.jsonl and writes plots/<name>.png with one
panel per quantity found (needs matplotlib: `pip install "mindprint-mlx[plot]"`).
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import MindprintError
from .io import atomic_path, read_jsonl

# panel title -> pattern over metric names (the first matching names are drawn)
PANELS = {
    "loss": re.compile(r"(^|/)(loss|\w*_loss|loss_\w*)(/|$)"),
    "learning rate": re.compile(r"(^|/)(lr|learning_rate)$"),
    "mean reward": re.compile(r"(^|/)(mean_score|score|scores|reward_mean|mean_reward|rewards?|score_mean|accuracy)$"),
    "KL": re.compile(r"(^|/)(kl|mean_kl|kl_coef|policy_kl|approx_kl|approxkl)$"),
}
MAX_LINES = 4


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MindprintError('plotting needs matplotlib: pip install "mindprint-mlx[plot]"') from None
    return plt


def numeric_series(rows: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """metric name -> (steps, values) for every numeric metric (row index when no step)."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for i, r in enumerate(rows):
        step = r.get("step", i)
        if not isinstance(step, (int, float)):
            step = i
        for k, v in r.items():
            if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            xs, ys = out.setdefault(k, ([], []))
            xs.append(float(step))
            ys.append(float(v))
    return out


def plot_metrics_file(path: Path, out_png: Path) -> Path | None:
    """One PNG with a panel per quantity found in a metrics JSONL; None if nothing to draw."""
    series = numeric_series(read_jsonl(path))
    panels = []
    for title, pat in PANELS.items():
        names = [k for k in series if pat.search(k)][:MAX_LINES]
        if names:
            panels.append((title, names))
    if not panels:
        return None
    plt = _matplotlib()
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), squeeze=False)
    for ax, (title, names) in zip(axes[:, 0], panels):
        for n in names:
            xs, ys = series[n]
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=n)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(path.stem, fontsize=10)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return out_png


def plot_run(run_dir: str | Path) -> list[Path]:
    """plots/<metrics file>.png for each metrics/*.jsonl of a run directory."""
    run_dir = Path(run_dir)
    mdir = run_dir / "metrics"
    files = sorted(mdir.glob("*.jsonl")) if mdir.is_dir() else []
    if not files:
        raise MindprintError(f"{run_dir}: no metrics/*.jsonl to plot (is this a run directory?)")
    _matplotlib()
    out = []
    for f in files:
        png = plot_metrics_file(f, run_dir / "plots" / f"{f.stem}.png")
        if png is not None:
            out.append(png)
    return out
