"""Pipeline runs you can compare: what the parent MLflow run records, and ``posttrain runs``.

A stage's nested run holds its own params and curves; the parent ``post-training`` run holds
the whole picture, so that selecting two parent runs in the MLflow UI and pressing *Compare*
shows what changed (every resolved param, dotted) and what it did (the headline metrics: the
evaluation table, the reward model, compression, the RAG index, the gate's decision), plus the
git commit and the ``dvc.lock`` hash that pin the lineage.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from components.config import flatten, to_dict
from components.params import load_params

PARENT_RUN_NAME = "post-training"
MODELS = ("base", "sft", "aligned", "compressed")
MODEL_METRICS = ("accuracy", "lenient_accuracy", "sampled_accuracy", "reward_mean", "perplexity")
# (metrics file stem, dotted key in it, name on the parent run)
HEADLINES: tuple[tuple[str, str, str], ...] = (
    *(("evaluate", f"{m}.{k}", f"{m}.{k}") for m in MODELS for k in MODEL_METRICS),
    ("evaluate", "reward_model_pairwise_accuracy", "reward_model.pairwise_accuracy"),
    ("evaluate", "kl_aligned_vs_sft", "aligned.kl_vs_sft"),
    ("preferences", "n_pairs", "preferences.n_pairs"),
    ("compress", "compression_ratio", "compress.ratio"),
    ("compress", "fidelity_kl", "compress.fidelity_kl"),
    ("rag_index", "n_documents", "rag.n_documents"),
    ("rag_index", "n_chunks", "rag.n_chunks"),
    ("multimodal", "flamingo.accuracy", "multimodal.flamingo_accuracy"),
    ("multimodal", "palme.accuracy", "multimodal.palme_accuracy"),
)


def headline_metrics(repo: Path, decision: dict[str, Any] | None = None) -> dict[str, float]:
    """The numbers a reader compares first, from ``metrics/<stage>.json`` (absent ones left out)."""
    metrics_dir = repo / load_params(repo / "params.yaml").paths.metrics
    files: dict[str, dict[str, Any]] = {}
    out: dict[str, float] = {}
    for stem, key, name in HEADLINES:
        if stem not in files:
            path = metrics_dir / f"{stem}.json"
            files[stem] = flatten(json.loads(path.read_text())) if path.is_file() else {}
        value = files[stem].get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    if decision is not None:
        out["promote.promoted"] = float(bool(decision.get("promoted")))
    return out


def log_pipeline_summary(repo: Path, decision: dict[str, Any] | None = None) -> None:
    """Log resolved params, headline metrics and lineage tags into the active (parent) MLflow run."""
    import mlflow

    from tasks.tracking import lineage_tags

    params = {
        k: ("" if v is None else str(v)[:500])
        for k, v in flatten(to_dict(load_params(repo / "params.yaml"))).items()
    }
    items = sorted(params.items())
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        mlflow.log_params(dict(items[start : start + 100]))
    mlflow.log_metrics(headline_metrics(repo, decision))
    mlflow.set_tags(lineage_tags(repo))
    if decision is not None:
        mlflow.set_tags(
            {
                "posttrain.promoted": str(bool(decision["promoted"])).lower(),
                "posttrain.gate_reason": decision["reason"],
            }
        )


def recent_runs(tracking: Any, n: int) -> list[Any]:
    """The last ``n`` parent runs, newest first."""
    from mlflow.tracking import MlflowClient

    from tasks.tracking import configure

    experiment_id = configure(tracking)
    return list(
        MlflowClient().search_runs(
            [experiment_id],
            filter_string=f"tags.mlflow.runName = '{PARENT_RUN_NAME}'",
            order_by=["attributes.start_time DESC"],
            max_results=n,
        )
    )


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_runs(runs: Sequence[Any]) -> str:
    """Runs side by side: the params that differ between them, then the headline metrics."""
    if not runs:
        return "no pipeline runs yet (run `posttrain run`)"
    names = [r.info.run_id[:8] for r in runs]
    rows: list[tuple[str, list[str]]] = [
        ("started", [datetime.fromtimestamp(r.info.start_time / 1000).strftime("%m-%d %H:%M") for r in runs]),
        ("status", [r.info.status for r in runs]),
        ("commit", [r.data.tags.get("posttrain.git_commit", "-")[:8] for r in runs]),
    ]
    keys = sorted({k for r in runs for k in r.data.params})
    differing = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]
    rows += [(k, [_cell(r.data.params.get(k)) for r in runs]) for k in differing]
    rows.append(("", ["" for _ in runs]))
    metric_names = [name for _, _, name in HEADLINES] + ["promote.promoted"]
    rows += [
        (name, [_cell(r.data.metrics.get(name)) for r in runs])
        for name in metric_names
        if any(name in r.data.metrics for r in runs)
    ]
    width = max(len(k) for k, _ in rows)
    col = max(10, *(len(c) for _, cells in rows for c in cells))
    lines = [f"{'run':<{width}}  " + "  ".join(f"{n:>{col}}" for n in names)]
    if len(runs) > 1 and not differing:
        lines.append("(no params differ between these runs)")
    lines += [f"{k:<{width}}  " + "  ".join(f"{c:>{col}}" for c in cells) for k, cells in rows]
    return "\n".join(lines)
