"""``posttrain compare [align|compress|peft]``: methods side by side, from ``dvc exp show``.

Each ``dvc exp run -S align.method=<m>`` is an experiment whose ``metrics/align.json`` and
``metrics/evaluate.json`` belong to the same lineage, so this reads them from DVC rather than
pairing MLflow runs by time. One row per distinct result (the workspace, the last commit, every
experiment): the method and its reward, the aligned model's greedy and sampled accuracy and
mean verifier reward on the held-out suite (with SFT's for reference), align's own held-out
report (reward before/after, KL to SFT), its wall time and peak memory. The same rows are drawn
as a PNG bar chart.

The ``compress`` view does the same for ``dvc exp run -S compress.method=<m>``: size ratio,
fidelity KL, accuracy delta and generation speed ratio against the merged model
(``metrics/compress.json``), the candidate's held-out accuracy (``metrics/evaluate.json``), and
a PNG of size ratio against accuracy.

The ``peft`` view, for ``dvc exp run sft -S sft.peft.method=<m>``: trainable parameters (count
and % of the model), peak memory, train time, adapter size on disk, and the SFT policy's
held-out loss, greedy accuracy and mean verifier reward (``metrics/sft.json``), with a PNG of
trainable share against accuracy.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from flows.metrics_view import _table

# column -> (metrics file, dotted key) ; "params" reads params.yaml
COLUMNS: dict[str, tuple[str, str]] = {
    "method": ("params", "align.method"),
    "reward": ("params", "align.reward"),
    "greedy": ("evaluate", "aligned.accuracy"),
    "sampled": ("evaluate", "aligned.sampled_accuracy"),
    "reward_mean": ("evaluate", "aligned.reward_mean"),
    "sft_greedy": ("evaluate", "sft.accuracy"),
    "sft_sampled": ("evaluate", "sft.sampled_accuracy"),
    "sft_reward": ("evaluate", "sft.reward_mean"),
    "reward_start": ("align", "reward_mean_start"),
    "reward_end": ("align", "reward_mean_end"),
    "kl_to_ref": ("align", "kl_to_ref"),
    "seconds": ("align", "train_seconds"),
    "peak_mb": ("align", "peak_memory_mb"),
}
CHART_COLUMNS = ("greedy", "sampled", "reward_mean")
COMPRESS_COLUMNS: dict[str, tuple[str, str]] = {
    "method": ("params", "compress.method"),
    "size_ratio": ("compress", "compression_ratio"),
    "fidelity_kl": ("compress", "fidelity_kl"),
    "accuracy_delta": ("compress", "accuracy_delta"),
    "speed_ratio": ("compress", "speed_ratio"),
    "candidate_greedy": ("evaluate", "compressed.accuracy"),
    "aligned_greedy": ("evaluate", "aligned.accuracy"),
    "delta_vs_fp16": ("compress", "delta_compression_vs_fp16"),
}
PEFT_COLUMNS: dict[str, tuple[str, str]] = {
    "method": ("params", "sft.peft.method"),
    "trainable": ("sft", "trainable_params"),
    "trainable_%": ("sft", "trainable_share"),
    "peak_mb": ("sft", "peak_memory_bytes"),
    "seconds": ("sft", "train_seconds"),
    "adapter_kb": ("sft", "adapter_bytes"),
    "eval_loss": ("sft", "eval_loss"),
    "accuracy": ("sft", "eval_accuracy"),
    "reward": ("sft", "eval_reward"),
}
# Display units for the peft view (the metrics keep bytes and shares).
PEFT_SCALE = {"trainable_%": 100.0, "peak_mb": 1 / 2**20, "adapter_kb": 1 / 2**10}
# view -> (columns, the metrics file a result must have to be a row)
VIEWS: dict[str, tuple[dict[str, tuple[str, str]], str]] = {
    "align": (COLUMNS, "align"),
    "compress": (COMPRESS_COLUMNS, "compress"),
    "peft": (PEFT_COLUMNS, "sft"),
}


def _get(data: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _entries(show: Sequence[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(label, data) for the workspace, each commit shown and each of its experiments."""
    for entry in show:
        rev = entry.get("rev", "")
        label = entry.get("name") or (rev if rev == "workspace" else rev[:7])
        if entry.get("data"):
            yield label, entry["data"]
        for exp in entry.get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev.get("data"):
                    yield rev.get("name") or rev.get("rev", "")[:7], rev["data"]


def rows_from_exp_show(show: Sequence[dict[str, Any]], view: str = "align") -> list[dict[str, Any]]:
    """One row per distinct (params, metrics) result; entries without the view's metrics are skipped."""
    columns, required = VIEWS[view]
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for label, data in _entries(show):
        params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
        metrics = {
            Path(name).stem: (value or {}).get("data") or {}
            for name, value in (data.get("metrics") or {}).items()
        }
        if not metrics.get(required):
            continue
        sources = {"params": params, **metrics}
        row = {"experiment": label}
        row |= {col: _get(sources.get(src, {}), key) for col, (src, key) in columns.items()}
        if view == "peft":
            row |= {c: row[c] * k for c, k in PEFT_SCALE.items() if isinstance(row.get(c), (int, float))}
        fingerprint = json.dumps({k: v for k, v in row.items() if k != "experiment"}, sort_keys=True)
        if fingerprint in seen:
            continue
        seen.add(fingerprint)
        rows.append(row)
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 3  # seconds, MB; scores
        return f"{value:.{digits}f}"
    return str(value)


def render(rows: Sequence[dict[str, Any]], markdown: bool = False, view: str = "align") -> str:
    header = ["experiment", *VIEWS[view][0]]
    cells = [[_cell(r.get(c)) for c in header] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines) + "\n"
    return "\n".join(_table(header, cells)) + "\n"


def chart(rows: Sequence[dict[str, Any]], path: Path | str, view: str = "align") -> Path:
    from components.charts import bar_chart, scatter_chart

    if view == "peft":
        points = {
            f"{r.get('method') or '?'} ({r['experiment']})": (
                float(r.get("trainable_%") or 0.0),
                float(r.get("accuracy") or 0.0),
            )
            for r in rows
        }
        return scatter_chart(
            path,
            points,
            xlabel="trainable parameters (% of the model)",
            ylabel="SFT held-out greedy accuracy",
            title="PEFT methods: what trains against what it gives",
        )
    if view == "compress":
        points = {
            f"{r['experiment']} {r.get('method') or '?'}": (
                float(r.get("size_ratio") or 0.0),
                float(r.get("candidate_greedy") or 0.0),
            )
            for r in rows
        }
        return scatter_chart(
            path,
            points,
            xlabel="size ratio (merged fp32 / compressed)",
            ylabel="candidate greedy accuracy",
            title="compression methods: size against held-out accuracy",
        )

    named = {}
    for r in rows:
        name = f"{r['experiment']}\n{r.get('method') or '?'}"
        named[name] = {c: float(r.get(c) or 0.0) for c in CHART_COLUMNS}
    return bar_chart(path, named, CHART_COLUMNS, title="aligned model on the held-out suite, by experiment")


def exp_show(root: Path | str = ".") -> list[dict[str, Any]]:
    """``dvc exp show --json`` (all experiments of the current commit, the workspace included)."""
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "show", "--json"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"dvc exp show failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout or "[]")
