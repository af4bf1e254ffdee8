"""PNG charts next to the plot CSVs: loss curves and the evaluation table, readable with no browser.

``dvc plots show`` draws the CSVs (vega, in a page); these PNGs are the same data as files:
DVC shows them as image plots, MLflow shows them under each run's artifacts, and anyone can
open them. matplotlib's Agg backend, fixed size and DPI, and no timestamp in the PNG metadata,
so the same data gives the same bytes (the files are DVC plot outputs, hashed in ``dvc.lock``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

PNG_METADATA = {"Software": None}  # no matplotlib version in the file: same data, same bytes


def _pyplot():  # noqa: ANN202 - matplotlib.pyplot, imported lazily (it is slow and needs a backend)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_chart(
    path: Path | str,
    history: Sequence[Mapping[str, float]],
    columns: Sequence[str],
    title: str,
    ylabel: str = "loss",
) -> Path:
    """A line per column of a trainer history (``loss`` per logging step, ``eval_loss`` per epoch)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for column in columns:
        points = [(row["step"], row[column]) for row in history if column in row]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o" if len(points) < 12 else None, label=column)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    else:  # e.g. base on a pretrained model: nothing trained, and the file still exists for DVC
        ax.text(0.5, 0.5, "no training steps", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, path)


def bar_chart(
    path: Path | str, rows: Mapping[str, Mapping[str, float]], metrics: Sequence[str], title: str
) -> Path:
    """Grouped bars: one group per row (a model), one bar per metric, each labelled with its value."""
    plt = _pyplot()
    names = list(rows)
    width = 0.8 / max(len(metrics), 1)
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=100)
    for i, metric in enumerate(metrics):
        xs = [j + (i - (len(metrics) - 1) / 2) * width for j in range(len(names))]
        values = [float(rows[n][metric]) for n in names]
        bars = ax.bar(xs, values, width=width, label=metric)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, max(1.0, *(float(rows[n][m]) for n in names for m in metrics)) * 1.12)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def scatter_chart(
    path: Path | str, points: Mapping[str, tuple[float, float]], xlabel: str, ylabel: str, title: str
) -> Path:
    """One labelled point per entry: e.g. each compression method's size ratio against accuracy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=100)
    for name, (x, y) in points.items():
        ax.scatter([x], [y])
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _save(fig, path: Path | str) -> Path:  # noqa: ANN001 - a matplotlib Figure
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.tight_layout()
    fig.savefig(tmp, format="png", metadata=PNG_METADATA)
    _pyplot().close(fig)
    tmp.replace(path)
    return path
