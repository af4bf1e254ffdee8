"""Stage ``rag_index``: parse ``rag_index.docs_dir``, chunk, embed and write the Milvus collection.

The output is the directory ``paths.rag`` (``data/rag``), which DVC tracks as a whole. With a
Milvus Lite ``uri`` (``data/rag/milvus.db``) the index is built from scratch inside a temp
sibling directory and renamed into place, so a crash never leaves a half-built index that looks
complete; the Lite file must therefore live inside ``paths.rag``. With a server ``uri``
(``http://milvus:19530``) the collection is dropped and rebuilt on the server and ``paths.rag``
only holds the description (config, manifest, metrics, skipped files).

Files that cannot be parsed are skipped and listed (metrics, ``skipped.json``, MLflow), never
fatal; an index with no document at all is an error.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from components.artifacts import atomic_dir, describe_output
from components.config import to_dict
from components.errors import DataError, MissingInputError, PosttrainError
from components.params import Params, RagIndexConfig
from components.rag.chunking import validate_chunking
from components.rag.embedding import BUNDLED_MINILM, get_embedder
from components.rag.index import IngestReport, ingest
from components.rag.store import RagStore, is_lite_uri, open_store
from components.tracking import Tracker
from tasks.stage import stage_command

STAGE = "rag_index"
SKIPPED_FILE = "skipped.json"


def lite_path_in_output(uri: str, out_dir: Path) -> Path:
    """The Lite file's path relative to the output dir; it must be inside (DVC tracks that dir)."""
    db = Path(os.path.abspath(uri))
    root = Path(os.path.abspath(out_dir))
    try:
        rel = db.relative_to(root)
    except ValueError:
        raise PosttrainError(
            f"rag_index.uri {uri!r} must be inside paths.rag ({out_dir}) so DVC versions the index, "
            "or be a Milvus server URL (http://host:19530)"
        ) from None
    if not rel.parts:
        raise PosttrainError(
            f"rag_index.uri {uri!r} must name a file inside paths.rag, not the directory itself"
        )
    return rel


def _build(cfg: RagIndexConfig, store: RagStore) -> IngestReport:
    embedder = get_embedder(cfg.embedding_model)
    store.recreate(embedder.dim)
    report = ingest(
        [cfg.docs_dir],
        store,
        embedder,
        max_characters=cfg.chunk_max_characters,
        overlap=cfg.chunk_overlap,
        languages=cfg.languages,
        progress=True,
    )
    if report.n_documents == 0:
        reasons = "; ".join(f"{s.source}: {s.reason}" for s in report.skipped[:5]) or "no supported files"
        raise DataError(f"{cfg.docs_dir}: no document could be indexed ({reasons})")
    return report


def _describe(out: Path, cfg: RagIndexConfig, report: IngestReport, metrics: dict[str, Any]) -> None:
    inputs: dict[str, Path | str] = {"docs_dir": cfg.docs_dir}
    if cfg.embedding_model != BUNDLED_MINILM:
        inputs["embedding_model"] = cfg.embedding_model
    config = {**to_dict(cfg), "indexed": dict(sorted(report.indexed.items()))}
    describe_output(out, stage=STAGE, config=config, inputs=inputs, seed=None, metrics=metrics)
    (out / SKIPPED_FILE).write_text(json.dumps(metrics["skipped"], indent=2) + "\n")


def run(params: Params, tracker: Tracker) -> dict[str, Any]:
    """Build the index described by ``params.rag_index`` and return its metrics."""
    cfg = params.rag_index
    out = Path(params.paths.rag)
    if not Path(cfg.docs_dir).is_dir():
        raise MissingInputError(f"rag_index.docs_dir: {cfg.docs_dir}: no such directory")
    validate_chunking(cfg.chunk_max_characters, cfg.chunk_overlap)

    if is_lite_uri(cfg.uri):
        rel = lite_path_in_output(cfg.uri, out)
        with atomic_dir(out) as tmp:
            # The store is closed (server stopped, lock released) before the rename.
            with open_store(str(tmp / rel), cfg.collection) as store:
                report = _build(cfg, store)
            metrics = report.metrics()
            _describe(tmp, cfg, report, metrics)
    else:
        with open_store(cfg.uri, cfg.collection) as store:
            report = _build(cfg, store)
        metrics = report.metrics()
        with atomic_dir(out) as tmp:
            _describe(tmp, cfg, report, metrics)

    tracker.set_tags({"rag_index.collection": cfg.collection, "rag_index.uri": cfg.uri})
    for s in report.skipped:
        print(f"posttrain {STAGE}: skipped {s.source}: {s.reason}", file=sys.stderr)
    if report.skipped:
        listing = "; ".join(f"{s.source}: {s.reason}" for s in report.skipped)
        tracker.set_tags({"rag_index.skipped": listing[:4000]})
    tracker.log_artifact(out / SKIPPED_FILE)
    return metrics


main = stage_command(STAGE, run)

if __name__ == "__main__":
    main()
