"""A Milvus collection of chunks with a dense and a BM25 sparse field, and three ways to search it.

Schema (one row per chunk):

=========  ====================  ==================================================
field      type                  why
=========  ====================  ==================================================
chunk_id   VARCHAR primary key   stable id from :mod:`components.rag.chunking`
source     VARCHAR               the path as given; re-ingest replaces by source
text       VARCHAR (analyzer)    returned to the user, and the BM25 function's input
page       INT64                 1-based page, 0 where the format has no pages
dense      FLOAT_VECTOR(dim)     MiniLM embedding, AUTOINDEX / COSINE
sparse     SPARSE_FLOAT_VECTOR   filled by Milvus from ``text`` (BM25 function)
=========  ====================  ==================================================

``uri`` is a Milvus Lite file (``data/rag/milvus.db``: an in-process server, one process per
file) or a server address (``http://host:19530``); the code path is the same. Milvus Lite
takes an exclusive lock on its file, so a second process gets :class:`StoreLockedError`
with a message that says so instead of pymilvus' bare "Open local milvus failed".
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from components.errors import PosttrainError

SearchMode = Literal["dense", "sparse", "hybrid"]
SEARCH_MODES: tuple[str, ...] = ("dense", "sparse", "hybrid")
RRF_K = 60
MAX_SOURCE_BYTES = 4096
_WRITE_BATCH = 256
_OUTPUT_FIELDS = ["chunk_id", "source", "text", "page"]

# Milvus Lite servers this module started, by absolute path -> number of open stores using it.
# Closing the last store stops the server, which releases the file lock and flushes to disk;
# pymilvus' own ``close()`` keeps the in-process server (and its lock) until process exit.
_LITE_USERS: dict[str, int] = {}
_LITE_GUARD = threading.Lock()


class StoreLockedError(PosttrainError):
    """The Milvus Lite file is held by another process."""


@dataclass(frozen=True)
class Hit:
    """One search result. ``score`` is higher-is-better in every mode (cosine, BM25, RRF)."""

    chunk_id: str
    source: str
    text: str
    page: int
    score: float

    def to_json(self) -> dict[str, Any]:
        """The CLI's ``--json`` hit: exactly source, score, text, chunk_id."""
        return {"source": self.source, "score": self.score, "text": self.text, "chunk_id": self.chunk_id}


def is_lite_uri(uri: str) -> bool:
    """pymilvus' own rule: a URI ending in ``.db`` is a Milvus Lite file, anything else a server."""
    return uri.endswith(".db")


def quote(value: str) -> str:
    """A Milvus filter string literal (Milvus Lite has no filter templates, so escape by hand)."""
    return json.dumps(value, ensure_ascii=False)


class _CaptureLiteStartup(logging.Handler):
    """Holds the exception milvus_lite logs (with a traceback) when its server fails to start."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])


def _connect(uri: str) -> Any:
    """Open a ``MilvusClient``; turn Lite's lock failure into one clear :class:`StoreLockedError`."""
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    if not is_lite_uri(uri):
        try:
            return MilvusClient(uri=uri)
        except MilvusException as exc:
            raise PosttrainError(f"cannot connect to Milvus at {uri}: {exc.message}") from None

    parent = os.path.dirname(os.path.abspath(uri))
    os.makedirs(parent, exist_ok=True)
    logger = logging.getLogger("milvus_lite.server_manager")
    capture = _CaptureLiteStartup()
    propagate = logger.propagate
    logger.addHandler(capture)
    logger.propagate = False  # its traceback would otherwise reach stderr via logging's last resort
    try:
        return MilvusClient(uri=uri)
    except MilvusException as exc:
        cause = next((e for e in capture.errors if type(e).__name__ == "DataDirLockedError"), None)
        if cause is not None:
            raise StoreLockedError(
                f"Milvus Lite database {uri} is locked: another process holds the lock "
                "(Milvus Lite allows one process per file); wait for it to finish or stop it, "
                "or use a Milvus server URI (--uri http://host:19530)"
            ) from None
        detail = f": {capture.errors[0]}" if capture.errors else f" ({exc.message})"
        raise PosttrainError(f"cannot open Milvus Lite database {uri}{detail}") from None
    finally:
        logger.removeHandler(capture)
        logger.propagate = propagate


class RagStore:
    """A connection to one collection. Use :func:`open_store` so it is always closed."""

    def __init__(self, uri: str, collection: str) -> None:
        if not collection:
            raise PosttrainError("collection name must not be empty")
        self.uri = uri
        self.collection = collection
        self._lite_path = os.path.abspath(uri) if is_lite_uri(uri) else None
        self._loaded = False
        self._client = _connect(uri)
        if self._lite_path is not None:
            with _LITE_GUARD:
                _LITE_USERS[self._lite_path] = _LITE_USERS.get(self._lite_path, 0) + 1

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the client; the last store on a Lite file also stops its server (lock released)."""
        if self._client is None:
            return
        try:
            self._client.close()
        finally:
            self._client = None
            if self._lite_path is not None:
                with _LITE_GUARD:
                    left = _LITE_USERS.get(self._lite_path, 1) - 1
                    if left <= 0:
                        _LITE_USERS.pop(self._lite_path, None)
                    else:
                        _LITE_USERS[self._lite_path] = left
                if left <= 0:
                    from milvus_lite.server_manager import server_manager_instance

                    server_manager_instance.release_server(self._lite_path)

    def __enter__(self) -> RagStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def client(self) -> Any:
        if self._client is None:
            raise PosttrainError("the RAG store is closed")
        return self._client

    # -- schema ----------------------------------------------------------------------------

    def exists(self) -> bool:
        with self._errors("has_collection"):
            return bool(self.client.has_collection(self.collection))

    def dense_dim(self) -> int | None:
        """The ``dense`` field's dimension of the existing collection (None if it does not exist)."""
        if not self.exists():
            return None
        with self._errors("describe_collection"):
            fields = self.client.describe_collection(self.collection)["fields"]
        for f in fields:
            if f["name"] == "dense":
                return int(f["params"]["dim"])
        raise PosttrainError(
            f"collection {self.collection!r} at {self.uri} has no 'dense' field: not a RAG index"
        )

    def ensure_collection(self, dim: int) -> None:
        """Create the collection if missing; refuse one whose vectors have another dimension."""
        existing = self.dense_dim()
        if existing is None:
            self._create(dim)
        elif existing != dim:
            raise PosttrainError(
                f"collection {self.collection!r} at {self.uri} holds {existing}-dim vectors but the "
                f"embedding model gives {dim}; use another --collection or rebuild the index"
            )

    def recreate(self, dim: int) -> None:
        """Drop and create the collection: the stage rebuilds the index from scratch."""
        if self.exists():
            with self._errors("drop_collection"):
                self.client.drop_collection(self.collection)
        self._loaded = False
        self._create(dim)

    def _create(self, dim: int) -> None:
        from pymilvus import DataType, Function, FunctionType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("chunk_id", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("source", DataType.VARCHAR, max_length=MAX_SOURCE_BYTES)
        schema.add_field("text", DataType.VARCHAR, max_length=65535, enable_analyzer=True)
        schema.add_field("page", DataType.INT64)
        schema.add_field("dense", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        schema.add_function(
            Function(
                name="text_bm25",
                function_type=FunctionType.BM25,
                input_field_names=["text"],
                output_field_names=["sparse"],
            )
        )
        index = self.client.prepare_index_params()
        index.add_index("dense", index_type="AUTOINDEX", metric_type="COSINE")
        index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
        # Strong consistency: a search right after an ingest sees it (matters on a server).
        with self._errors("create_collection"):
            self.client.create_collection(
                self.collection, schema=schema, index_params=index, consistency_level="Strong"
            )

    def _require(self) -> None:
        """Fail clearly if the collection is missing; load it for search (once per store).

        A collection reopened by a new process starts out released, and search refuses to run
        on a released collection; loading an already loaded one is a no-op.
        """
        if not self.exists():
            raise PosttrainError(
                f"collection {self.collection!r} not found at {self.uri}; build it with "
                "`posttrain rag ingest PATH` or the rag_index stage"
            )
        if not self._loaded:
            with self._errors("load"):
                self.client.load_collection(self.collection)
            self._loaded = True

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """A Milvus failure (server down, bad state) as one line naming the collection and URI."""
        from pymilvus.exceptions import MilvusException

        try:
            yield
        except MilvusException as exc:
            raise PosttrainError(
                f"Milvus {action} failed for collection {self.collection!r} at {self.uri}: {exc.message}"
            ) from exc

    # -- writes ----------------------------------------------------------------------------

    def replace_source(self, source: str, chunks: Sequence[Any], vectors: np.ndarray) -> int:
        """Make ``source``'s rows exactly ``chunks``: upsert them, then delete its other rows.

        Upsert-then-prune (rather than delete-then-insert) means a reader never sees the
        document missing, and a crash mid-way leaves at worst a few stale chunks that the next
        ingest removes. Returns the number of rows written.
        """
        if len(source.encode()) > MAX_SOURCE_BYTES:
            raise PosttrainError(f"source path longer than {MAX_SOURCE_BYTES} bytes: {source[:80]}...")
        if len(chunks) != len(vectors):
            raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors")
        rows = [
            {
                "chunk_id": c.chunk_id,
                "source": source,
                "text": c.text,
                "page": int(c.page),
                "dense": [float(x) for x in v],
            }
            for c, v in zip(chunks, vectors, strict=True)
        ]
        with self._errors("upsert"):
            for start in range(0, len(rows), _WRITE_BATCH):
                self.client.upsert(self.collection, rows[start : start + _WRITE_BATCH])
        keep = ", ".join(quote(r["chunk_id"]) for r in rows)
        expr = f"source == {quote(source)}" + (f" and chunk_id not in [{keep}]" if keep else "")
        with self._errors("delete"):
            self.client.delete(self.collection, filter=expr)
        return len(rows)

    def delete_source(self, source: str) -> None:
        with self._errors("delete"):
            self.client.delete(self.collection, filter=f"source == {quote(source)}")

    # -- reads -----------------------------------------------------------------------------

    def count(self, source: str | None = None) -> int:
        """Rows in the collection (or of one source)."""
        self._require()
        expr = f"source == {quote(source)}" if source is not None else ""
        with self._errors("count"):
            res = self.client.query(
                self.collection, filter=expr, output_fields=["count(*)"], consistency_level="Strong"
            )
        return int(res[0]["count(*)"]) if res else 0

    def sources(self) -> list[str]:
        """Distinct sources, sorted (for listing what an index holds)."""
        self._require()
        with self._errors("query"):
            rows = self.client.query(
                self.collection,
                filter='chunk_id != ""',
                output_fields=["source"],
                limit=16384,
                consistency_level="Strong",
            )
        return sorted({r["source"] for r in rows})

    def search(
        self,
        question: str,
        vector: np.ndarray | Sequence[float] | None,
        mode: SearchMode = "hybrid",
        top_k: int = 5,
    ) -> list[Hit]:
        """Top ``top_k`` chunks for one question.

        ``dense``: cosine similarity of MiniLM vectors (meaning, paraphrases). ``sparse``: BM25
        over the chunk text (exact names and numbers). ``hybrid``: both, fused by reciprocal
        rank fusion with k=60, which needs no score calibration between the two. ``vector`` (the
        question's embedding) may be None in ``sparse`` mode only.
        """
        if mode not in SEARCH_MODES:
            raise PosttrainError(f"unknown search mode {mode!r} (choose from {', '.join(SEARCH_MODES)})")
        if top_k < 1:
            raise PosttrainError(f"top_k must be at least 1, got {top_k}")
        if vector is None and mode != "sparse":
            raise ValueError(f"{mode} search needs the question's embedding")
        self._require()
        dense = [float(x) for x in vector] if vector is not None else []
        with self._errors(f"{mode} search"):
            if mode == "hybrid":
                from pymilvus import AnnSearchRequest, RRFRanker

                # Each leg fetches more than top_k so the fusion has candidates from both sides.
                leg = max(top_k * 2, 10)
                reqs = [
                    AnnSearchRequest(
                        data=[dense], anns_field="dense", param={"metric_type": "COSINE"}, limit=leg
                    ),
                    AnnSearchRequest(
                        data=[question], anns_field="sparse", param={"metric_type": "BM25"}, limit=leg
                    ),
                ]
                res = self.client.hybrid_search(
                    self.collection,
                    reqs,
                    RRFRanker(RRF_K),
                    limit=top_k,
                    output_fields=_OUTPUT_FIELDS,
                    consistency_level="Strong",
                )
            else:
                res = self.client.search(
                    self.collection,
                    data=[dense] if mode == "dense" else [question],
                    anns_field=mode,  # the field names are the mode names
                    limit=top_k,
                    output_fields=_OUTPUT_FIELDS,
                    search_params={"metric_type": "COSINE" if mode == "dense" else "BM25"},
                    consistency_level="Strong",
                )
        hits = []
        for raw in res[0] if res else []:
            entity = raw.get("entity", {})
            score = float(raw["distance"])
            if mode == "sparse":
                # Milvus Lite reports BM25 as a distance (-score), a server as the score itself.
                score = abs(score)
            hits.append(
                Hit(
                    chunk_id=str(entity.get("chunk_id", raw.get("chunk_id", raw.get("id")))),
                    source=str(entity.get("source", "")),
                    text=str(entity.get("text", "")),
                    page=int(entity.get("page") or 0),
                    score=score,
                )
            )
        return hits


@contextmanager
def open_store(uri: str, collection: str) -> Iterator[RagStore]:
    """Open a :class:`RagStore` and always close it (and release a Lite file's lock)."""
    store = RagStore(uri, collection)
    try:
        yield store
    finally:
        store.close()
