"""The RAG refresh flow: re-index the documents that changed, on its own schedule.

Documents change on their own clock (a wiki page edited, a manual replaced), much more often
than a model is retrained, so ``posttrain serve --flow rag-refresh --interval 900`` schedules
this flow separately from training. It first compares ``rag_index.docs_dir`` with what the
index was built from (file hashes recorded per chunk), then:

* Milvus Lite index inside ``paths.rag`` (the default): the index is a DVC output, so the flow
  runs the RAG stages (``rag_index``, ``rag_reranker``, ``rag_eval``) through the post-training
  flow; DVC re-runs them only when the documents changed, and the new index is versioned.
* Milvus server (``rag_index.uri: http://...``): the live collection is updated in place,
  incrementally: changed files have their chunks replaced, deleted files are pruned, unchanged
  files are not even parsed.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from prefect import flow, task

from components.params import Params, load_params

RAG_STAGES: list[str] = ["rag_index", "rag_reranker", "rag_eval"]


def _uri(params: Params, repo: Path) -> str:
    from components.rag.store import is_lite_uri

    uri = params.rag_index.uri
    return str(repo / uri) if is_lite_uri(uri) and not os.path.isabs(uri) else uri


@task(task_run_name="compare-docs")
def compare_docs(repo_dir: str) -> dict[str, list[str]]:
    """``{"added", "changed", "deleted", "unchanged"}`` sources: the folder vs the index."""
    from components.rag.index import file_hash
    from components.rag.parsing import collect_files
    from components.rag.store import is_lite_uri, open_store

    repo = Path(repo_dir).resolve()
    params = load_params(repo / "params.yaml")
    cfg = params.rag_index
    with contextlib.chdir(repo):  # sources are recorded relative to the project root
        files, _ = collect_files([cfg.docs_dir])
        uri = _uri(params, repo)
        known: dict[str, str] = {}
        if not is_lite_uri(uri) or os.path.exists(uri):
            with open_store(uri, cfg.collection) as store:
                known = store.file_hashes() if store.exists() else {}
        now = {f: file_hash(f) for f in files}
    return {
        "added": sorted(f for f in now if f not in known),
        "changed": sorted(f for f in now if f in known and known[f] != now[f]),
        "deleted": sorted(f for f in known if f not in now),
        "unchanged": sorted(f for f in now if known.get(f) == now[f]),
    }


@task(task_run_name="ingest-incremental")
def ingest_incremental(repo_dir: str) -> dict[str, Any]:
    """Update a server collection in place (changed files replaced, deleted files pruned)."""
    from components.rag.embedding import get_embedder
    from components.rag.store import open_store
    from tasks.rag_index import ingest_with_config

    repo = Path(repo_dir).resolve()
    cfg = load_params(repo / "params.yaml").rag_index
    with contextlib.chdir(repo), open_store(cfg.uri, cfg.collection) as store:
        report = ingest_with_config(cfg, [cfg.docs_dir], store, get_embedder(cfg.embedding_model), prune=True)
    metrics = report.metrics()
    return {k: v for k, v in metrics.items() if not isinstance(v, list)}


@flow(name="rag-refresh", log_prints=True)
def rag_refresh(repo_dir: str = ".", track: bool = True) -> dict[str, Any]:
    """Re-index what changed in ``rag_index.docs_dir``; returns the comparison and what ran."""
    from components.rag.store import is_lite_uri

    repo = Path(repo_dir).resolve()
    params = load_params(repo / "params.yaml")
    diff = compare_docs(str(repo))
    counts = {k: len(v) for k, v in diff.items()}
    print(
        "rag-refresh: {added} added, {changed} changed, {deleted} deleted, {unchanged} unchanged".format(
            **counts
        )
    )
    result: dict[str, Any] = {"docs": counts}
    if is_lite_uri(params.rag_index.uri):
        from flows.post_training import post_training

        # DVC decides from the same hashes; the stages are skipped when nothing changed.
        result["stages"] = post_training(repo_dir=str(repo), stages=RAG_STAGES, track=track)
    elif counts["added"] or counts["changed"] or counts["deleted"]:
        result["ingest"] = ingest_incremental(str(repo))
    else:
        result["ingest"] = "up to date"
    return result
