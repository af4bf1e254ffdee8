"""Stage ``rag_index``: parse ``rag_index.docs_dir``, chunk, embed and write the Milvus collection.

The output is the directory ``paths.rag`` (``data/rag``), which DVC tracks as a whole. With a
Milvus Lite ``uri`` (``data/rag/milvus.db``) the index is built from scratch inside a temp
sibling directory and renamed into place, so a crash never leaves a half-built index that looks
complete; the Lite file must therefore live inside ``paths.rag``. With a server ``uri``
(``http://milvus:19530``) the index is built into a fresh collection beside the live one and the
name ``rag_index.collection`` (an alias) is then switched to it, so queries never face an empty
or half-built collection; ``paths.rag`` only holds the description (config, manifest, metrics,
skipped files).

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
from components.rag.chunking import CHARS_PER_TOKEN, ChunkingConfig
from components.rag.embedding import BUNDLED_MINILM, get_embedder
from components.rag.index import IngestReport, index_record, ingest
from components.rag.store import RagStore, is_lite_uri, open_store
from components.tracking import Tracker
from tasks.stage import stage_command

STAGE = "rag_index"
SKIPPED_FILE = "skipped.json"
# The rag_index keys that shape the index (dvc.yaml's params for this stage); the rest are query time.
BUILD_KEYS: tuple[str, ...] = (
    "docs_dir",
    "uri",
    "collection",
    "embedding_model",
    "chunking",
    "chunk_tokens",
    "chunk_overlap_tokens",
    "window_sentences",
    "near_duplicate_threshold",
    "index_type",
    "flat_below",
    "languages",
)


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


def chunking_config(cfg: RagIndexConfig) -> ChunkingConfig:
    """The chunker settings of ``rag_index`` (shared with ``posttrain rag ingest``)."""
    return ChunkingConfig(cfg.chunking, cfg.chunk_tokens, cfg.chunk_overlap_tokens, cfg.window_sentences)


def index_options(cfg: RagIndexConfig) -> dict[str, Any]:
    return {"index_type": cfg.index_type, "flat_below": cfg.flat_below}


def ingest_with_config(
    cfg: RagIndexConfig,
    paths: list[str],
    store: RagStore,
    embedder: Any,
    *,
    prune: bool = False,
    progress: bool = False,
) -> IngestReport:
    """:func:`ingest` with ``rag_index``'s build settings: the stage, the CLI and the refresh flow agree."""
    return ingest(
        paths,
        store,
        embedder,
        chunking=chunking_config(cfg),
        near_duplicate_threshold=cfg.near_duplicate_threshold,
        prune=prune,
        languages=cfg.languages,
        progress=progress,
        index_options=index_options(cfg),
    )


def expected_rows(docs_dir: str, cfg: RagIndexConfig) -> int:
    """A size estimate (bytes / chunk size) that picks FLAT or HNSW before anything is chunked."""
    total = sum(p.stat().st_size for p in Path(docs_dir).rglob("*") if p.is_file())
    return total // (cfg.chunk_tokens * CHARS_PER_TOKEN) + 1


def _build(cfg: RagIndexConfig, store: RagStore) -> IngestReport:
    embedder = get_embedder(cfg.embedding_model)
    chunking = chunking_config(cfg)
    store.recreate(index_record(embedder, chunking, **index_options(cfg)), expected_rows(cfg.docs_dir, cfg))
    report = ingest_with_config(cfg, [cfg.docs_dir], store, embedder, progress=True)
    if report.n_documents == 0:
        reasons = "; ".join(f"{s.source}: {s.reason}" for s in report.skipped[:5]) or "no supported files"
        raise DataError(f"{cfg.docs_dir}: no document could be indexed ({reasons})")
    return report


def build_behind_alias(cfg: RagIndexConfig, uri: str) -> IngestReport:
    """Build into the spare of two slots (``NAME__a``/``NAME__b``) and point the alias ``NAME`` at it.

    Readers keep using the old collection through the alias until the new one is complete;
    the previous slot is dropped only after the switch. A plain collection that already
    holds the alias' name (an index built before aliases) is dropped first, once.
    """
    name = cfg.collection
    with open_store(uri, name) as probe:
        client = probe.client
        aliases = client.list_aliases(name).get("aliases", []) if client.has_collection(name) else []
        current = client.describe_alias(name)["collection_name"] if name in aliases else None
        if current is None and client.has_collection(name):
            client.drop_collection(name)
    spare = f"{name}__b" if current == f"{name}__a" else f"{name}__a"
    with open_store(uri, spare) as store:
        report = _build(cfg, store)
        client = store.client
        if current is None:
            client.create_alias(spare, name)
        else:
            client.alter_alias(spare, name)
            client.drop_collection(current)
    return report


def _describe(out: Path, cfg: RagIndexConfig, report: IngestReport, metrics: dict[str, Any]) -> None:
    inputs: dict[str, Path | str] = {"docs_dir": cfg.docs_dir}
    if cfg.embedding_model != BUNDLED_MINILM:
        inputs["embedding_model"] = cfg.embedding_model
    build = {k: v for k, v in to_dict(cfg).items() if k in BUILD_KEYS}  # query-time keys change nothing here
    config = {**build, "indexed": dict(sorted(report.indexed.items()))}
    describe_output(out, stage=STAGE, config=config, inputs=inputs, seed=None, metrics=metrics)
    (out / SKIPPED_FILE).write_text(json.dumps(metrics["skipped"], indent=2) + "\n")


def run(params: Params, tracker: Tracker) -> dict[str, Any]:
    """Build the index described by ``params.rag_index`` and return its metrics."""
    cfg = params.rag_index
    out = Path(params.paths.rag)
    if not Path(cfg.docs_dir).is_dir():
        raise MissingInputError(f"rag_index.docs_dir: {cfg.docs_dir}: no such directory")
    chunking_config(cfg).validate()

    if is_lite_uri(cfg.uri):
        rel = lite_path_in_output(cfg.uri, out)
        with atomic_dir(out) as tmp:
            # The store is closed (server stopped, lock released) before the rename.
            with open_store(str(tmp / rel), cfg.collection) as store:
                report = _build(cfg, store)
            metrics = report.metrics()
            _describe(tmp, cfg, report, metrics)
    else:
        report = build_behind_alias(cfg, cfg.uri)
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
