"""``posttrain metrics``: every stage's ``metrics/<stage>.json`` as narrow tables a terminal can show.

``dvc metrics show`` prints one row per file with every nested key as a column (about 1,800
characters wide for this DAG). Here the evaluation is a model-by-metric table (the per-task
accuracies as ``add/capital/reverse/upper``; greedy = exact-match accuracy), and every other
stage is a short ``key value`` list, nested keys dotted.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from components.config import flatten

MODELS = ("base", "sft", "aligned", "compressed")
# column -> metric key in metrics/evaluate.json
EVAL_COLUMNS = {
    "greedy": "accuracy",
    "lenient": "lenient_accuracy",
    "sampled": "sampled_accuracy",
    "reward": "reward_mean",
    "ppl": "perplexity",
}


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}" if abs(value) >= 1e4 or (value and abs(value) < 1e-3) else f"{value:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def evaluate_table(data: dict[str, Any]) -> list[str]:
    models = [m for m in MODELS if m in data]
    tasks = sorted({t for m in models for t in data[m].get("accuracy_by_task", {})})
    header = ["model", *EVAL_COLUMNS, "/".join(tasks) if tasks else "by task"]
    rows = [
        [
            m + (" (candidate)" if data.get("candidate") == m else ""),
            *(f"{data[m][k]:.3f}" if k in data[m] else "" for k in EVAL_COLUMNS.values()),
            " / ".join(f"{data[m]['accuracy_by_task'].get(t, 0):.2f}" for t in tasks),
        ]
        for m in models
    ]
    lines = _table(header, rows)
    rest = {k: v for k, v in flatten(data).items() if k.split(".")[0] not in MODELS}
    return lines + [""] + _table(["key", "value"], [[k, _fmt(v)] for k, v in sorted(rest.items())])


def render(metrics_dir: Path | str = "metrics", stages: Sequence[str] = (), order: Sequence[str] = ()) -> str:
    """The tables for ``stages`` (all when empty), in ``order`` (the DAG's) then by name."""
    rank = {name: i for i, name in enumerate(order)}
    files = sorted(Path(metrics_dir).glob("*.json"), key=lambda f: (rank.get(f.stem, len(rank)), f.stem))
    chosen = [f for f in files if not stages or f.stem in stages]
    if not chosen:
        return f"no metrics in {metrics_dir}/ (run the pipeline first: `posttrain run`)"
    out: list[str] = []
    for path in chosen:
        data = json.loads(path.read_text())
        out += [f"== {path.stem} ({path})"]
        if path.stem == "evaluate":
            out += evaluate_table(data)
        else:
            out += _table(["key", "value"], [[k, _fmt(v)] for k, v in sorted(flatten(data).items())])
        out.append("")
    return "\n".join(out).rstrip() + "\n"
