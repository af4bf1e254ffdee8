"""A Milvus collection of chunks with a dense and a BM25 sparse field, and three ways to search it.

Schema (one row per chunk):

============  ====================  ===============================================
field         type                  why
============  ====================  ===============================================
chunk_id      VARCHAR primary key   stable id from :mod:`components.rag.chunking`
source        VARCHAR               the path as given; re-ingest replaces by source
text          VARCHAR (analyzer)    what is matched: the BM25 function's input
context       VARCHAR               what the reader gets instead (sentence windows)
title         VARCHAR               the document's title (its first heading)
section       VARCHAR               heading path, "Chapter > Section"
page          INT64                 1-based page, 0 where the format has no pages
file_type     VARCHAR               pdf, html, md, docx, txt (for ``--filter``)
modified      INT64                 the file's mtime, Unix seconds
content_hash  VARCHAR               sha256 of the chunk: unchanged chunks are not rewritten
file_hash     VARCHAR               sha256 of the file: unchanged files are not even parsed
dense         FLOAT_VECTOR(dim)     MiniLM embedding, FLAT or HNSW / COSINE
sparse        SPARSE_FLOAT_VECTOR   filled by Milvus from ``text`` (BM25 function)
============  ====================  ===============================================

The collection records how it was built (embedding model, dimension, chunking) as a
collection property; querying or ingesting with another embedding model fails loudly instead
of returning nonsense neighbours.

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
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from components.errors import PosttrainError

SearchMode = Literal["dense", "sparse", "hybrid"]
SEARCH_MODES: tuple[str, ...] = ("dense", "sparse", "hybrid")
RRF_K = 60
MAX_SOURCE_BYTES = 4096
MAX_FILTER_CHARACTERS = 2000
CONFIG_PROPERTY = "posttrain.index"  # collection property: how the index was built (JSON)
SCHEMA_VERSION = 2
HNSW_BUILD = {"M": 16, "efConstruction": 200}
_WRITE_BATCH = 256
METADATA_FIELDS: tuple[str, ...] = ("title", "section", "page", "file_type", "modified", "content_hash")
FILTER_FIELDS: tuple[str, ...] = ("source", "chunk_id", *METADATA_FIELDS, "file_hash")
_OUTPUT_FIELDS = ["chunk_id", "source", "text", "context", *METADATA_FIELDS]

# Milvus Lite servers this module started, by absolute path -> number of open stores using it.
# Closing the last store stops the server, which releases the file lock and flushes to disk;
# pymilvus' own ``close()`` keeps the in-process server (and its lock) until process exit.
_LITE_USERS: dict[str, int] = {}
_LITE_GUARD = threading.Lock()


class StoreLockedError(PosttrainError):
    """The Milvus Lite file is held by another process."""


class FilterError(PosttrainError):
    """A ``--filter`` expression Milvus cannot parse, or one naming an unknown field."""


class IndexMismatchError(PosttrainError):
    """The collection was built with another embedding model or chunking than requested."""


@dataclass(frozen=True)
class Hit:
    """One search result. ``score`` is higher-is-better in every mode (cosine, BM25, RRF, reranker).

    ``text`` is what the reader gets: a sentence window's neighbourhood, otherwise the chunk.
    """

    chunk_id: str
    source: str
    text: str
    page: int
    score: float
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)
    matched: str = ""  # the indexed text when it differs from ``text`` (sentence windows)

    def to_json(self) -> dict[str, Any]:
        """The CLI's ``--json`` hit: source, score, text, chunk_id and metadata."""
        return {
            "source": self.source,
            "score": self.score,
            "text": self.text,
            "chunk_id": self.chunk_id,
            "metadata": dict(self.metadata),
        }

    def with_score(self, score: float) -> Hit:
        return replace(self, score=float(score))


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
        self._index_type: str | None = None
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

    def config(self) -> dict[str, Any] | None:
        """How the collection was built (its ``posttrain.index`` property), None if it does not exist."""
        if not self.exists():
            return None
        with self._errors("describe_collection"):
            described = self.client.describe_collection(self.collection)
        raw = (described.get("properties") or {}).get(CONFIG_PROPERTY)
        if raw is None:
            names = {f["name"] for f in described["fields"]}
            what = "not a RAG index" if "dense" not in names else "built by an older posttrain"
            raise IndexMismatchError(
                f"collection {self.collection!r} at {self.uri} is {what}; rebuild it "
                "(`posttrain run` rebuilds the rag_index stage) or use another --collection"
            )
        return dict(json.loads(raw))

    def ensure_collection(self, built: dict[str, Any], expected_rows: int = 0) -> None:
        """Create the collection if missing; refuse one built with another model or chunking.

        ``built`` holds ``embedding_model``, ``dim`` and ``chunking``; mixing two embedding
        models in one collection would make every distance meaningless, and mixing chunkers
        would make the ingest's "unchanged" test wrong.
        """
        existing = self.config()
        if existing is None:
            self._create(built, expected_rows)
            return
        self.check_compatible(built, existing)

    def check_compatible(self, wanted: dict[str, Any], existing: dict[str, Any] | None = None) -> None:
        """Raise :class:`IndexMismatchError` when ``wanted`` keys differ from how the index was built."""
        existing = existing if existing is not None else self.config()
        if existing is None:
            return
        for key in ("embedding_model", "dim", "chunking"):
            if key in wanted and key in existing and wanted[key] != existing[key]:
                raise IndexMismatchError(
                    f"collection {self.collection!r} at {self.uri} was built with {key} "
                    f"{existing[key]!r}, not {wanted[key]!r}; use the same rag_index settings, "
                    "another --collection, or rebuild the index"
                )

    def recreate(self, built: dict[str, Any], expected_rows: int = 0) -> None:
        """Drop and create the collection: the stage rebuilds the index from scratch."""
        if self.exists():
            with self._errors("drop_collection"):
                self.client.drop_collection(self.collection)
        self._loaded = False
        self._create(built, expected_rows)

    def _create(self, built: dict[str, Any], expected_rows: int) -> None:
        from pymilvus import DataType, Function, FunctionType, MilvusClient

        dim = int(built["dim"])
        index_type = choose_index_type(
            built.get("index_type", "auto"), expected_rows, built.get("flat_below")
        )
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("chunk_id", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("source", DataType.VARCHAR, max_length=MAX_SOURCE_BYTES)
        schema.add_field("text", DataType.VARCHAR, max_length=65535, enable_analyzer=True)
        schema.add_field("context", DataType.VARCHAR, max_length=65535)
        schema.add_field("title", DataType.VARCHAR, max_length=2048)
        schema.add_field("section", DataType.VARCHAR, max_length=4096)
        schema.add_field("page", DataType.INT64)
        schema.add_field("file_type", DataType.VARCHAR, max_length=16)
        schema.add_field("modified", DataType.INT64)
        schema.add_field("content_hash", DataType.VARCHAR, max_length=64)
        schema.add_field("file_hash", DataType.VARCHAR, max_length=64)
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
        params = HNSW_BUILD if index_type == "HNSW" else {}
        index.add_index("dense", index_type=index_type, metric_type="COSINE", params=params)
        index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
        record = {**built, "index_type": index_type, "schema_version": SCHEMA_VERSION}
        # Strong consistency: a search right after an ingest sees it (matters on a server).
        with self._errors("create_collection"):
            self.client.create_collection(
                self.collection, schema=schema, index_params=index, consistency_level="Strong"
            )
            self.client.alter_collection_properties(
                self.collection, properties={CONFIG_PROPERTY: json.dumps(record, sort_keys=True)}
            )
        self._index_type = index_type

    def index_type(self) -> str:
        """FLAT or HNSW: what the dense field is indexed with (search parameters differ)."""
        if self._index_type is None:
            with self._errors("describe_index"):
                self._index_type = str(self.client.describe_index(self.collection, "dense")["index_type"])
        return self._index_type

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
                f"Milvus {action} failed for collection {self.collection!r} at {self.uri}: "
                f"{_first_line(exc.message)}"
            ) from exc

    # -- writes ----------------------------------------------------------------------------

    def replace_source(
        self, source: str, chunks: Sequence[Any], vectors: np.ndarray, file_info: dict[str, Any]
    ) -> int:
        """Make ``source``'s rows exactly ``chunks``: upsert them, then delete its other rows.

        Upsert-then-prune (rather than delete-then-insert) means a reader never sees the
        document missing, and a crash mid-way leaves at worst a few stale chunks that the next
        ingest removes. ``file_info`` holds ``file_type``, ``modified`` and ``file_hash``.
        Returns the number of rows written.
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
                "context": c.context,
                "title": c.title[:500],
                "section": c.section[:1000],
                "page": int(c.page),
                "file_type": str(file_info["file_type"])[:16],
                "modified": int(file_info["modified"]),
                "content_hash": c.content_hash,
                "file_hash": str(file_info["file_hash"]),
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

    def delete_source(self, source: str) -> int:
        """Remove every chunk of ``source``; returns how many there were."""
        n = self.count(source)
        with self._errors("delete"):
            self.client.delete(self.collection, filter=f"source == {quote(source)}")
        return n

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

    def _query_all(self, expr: str, fields: list[str]) -> list[dict[str, Any]]:
        """Every row matching ``expr`` (paged: a single query is capped at 16,384 rows)."""
        self._require()
        # Milvus Lite has no server-side timestamp for iterators; pymilvus warns on every call.
        noisy = logging.getLogger("pymilvus.client.iterator.query_iterator")
        level = noisy.level
        noisy.setLevel(logging.ERROR)
        with self._errors("query"):
            iterator = self.client.query_iterator(
                self.collection, batch_size=4096, filter=expr, output_fields=fields
            )
            rows: list[dict[str, Any]] = []
            try:
                while batch := iterator.next():
                    rows.extend(batch)
            finally:
                iterator.close()
                noisy.setLevel(level)
        return rows

    def sources(self) -> list[str]:
        """Distinct sources, sorted (for listing what an index holds)."""
        return sorted({r["source"] for r in self._query_all('chunk_id != ""', ["source"])})

    def file_hashes(self) -> dict[str, str]:
        """source -> the file hash its chunks were built from (what makes re-ingest incremental)."""
        return {
            r["source"]: r["file_hash"] for r in self._query_all('chunk_id != ""', ["source", "file_hash"])
        }

    def chunk_hashes(self, source: str) -> dict[str, str]:
        """chunk_id -> content hash of one source's rows (to count added/updated/removed)."""
        rows = self._query_all(f"source == {quote(source)}", ["chunk_id", "content_hash"])
        return {r["chunk_id"]: r["content_hash"] for r in rows}

    def passages(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Rows as dicts (chunk_id, source, text, context, title, section), sorted by chunk id."""
        rows = self._query_all(
            'chunk_id != ""', ["chunk_id", "source", "text", "context", "title", "section"]
        )
        rows.sort(key=lambda r: r["chunk_id"])
        return rows[:limit] if limit is not None else rows

    def validate_filter(self, expr: str) -> str:
        """Check a Milvus boolean expression against this collection; returns it stripped.

        Milvus parses it (a one-row query), so the grammar is exactly the server's; the error
        keeps Milvus' own position marker and lists the fields one can filter on.
        """
        expr = (expr or "").strip()
        if not expr:
            raise FilterError("--filter must not be empty")
        if len(expr) > MAX_FILTER_CHARACTERS:
            raise FilterError(f"--filter is {len(expr)} characters long; at most {MAX_FILTER_CHARACTERS}")
        self._require()
        from pymilvus.exceptions import MilvusException

        try:
            self.client.query(self.collection, filter=expr, output_fields=["chunk_id"], limit=1)
        except MilvusException as exc:
            raise FilterError(
                f"invalid --filter {expr!r}: {_first_line(exc.message)} "
                f"(fields: {', '.join(FILTER_FIELDS)}; e.g. 'file_type == \"pdf\" and page > 2')"
            ) from None
        return expr

    def search(
        self,
        question: str,
        vector: np.ndarray | Sequence[float] | None,
        mode: SearchMode = "hybrid",
        top_k: int = 5,
        *,
        filter: str = "",
        fusion: str = "rrf",
        rrf_k: int = RRF_K,
        dense_weight: float = 0.5,
        with_vectors: bool = False,
    ) -> list[Hit]:
        """Top ``top_k`` chunks for one question.

        ``dense``: cosine similarity of MiniLM vectors (meaning, paraphrases). ``sparse``: BM25
        over the chunk text (exact names and numbers). ``hybrid``: both through Milvus'
        ``hybrid_search``, fused by reciprocal rank fusion (``rrf_k``; needs no score
        calibration) or by a weighted sum of normalised scores (``fusion="weighted"``).
        ``vector`` (the question's embedding) may be None in ``sparse`` mode only; ``filter``
        is a Milvus boolean expression over the metadata fields.
        """
        if mode not in SEARCH_MODES:
            raise PosttrainError(f"unknown search mode {mode!r} (choose from {', '.join(SEARCH_MODES)})")
        if top_k < 1:
            raise PosttrainError(f"top_k must be at least 1, got {top_k}")
        if vector is None and mode != "sparse":
            raise ValueError(f"{mode} search needs the question's embedding")
        self._require()
        dense = [float(x) for x in vector] if vector is not None else []
        fields = _OUTPUT_FIELDS + (["dense"] if with_vectors else [])
        dense_params: dict[str, Any] = {"metric_type": "COSINE"}
        if self.index_type() == "HNSW":
            dense_params["params"] = {"ef": max(64, top_k * 2)}
        with self._errors(f"{mode} search"):
            if mode == "hybrid":
                from pymilvus import AnnSearchRequest, RRFRanker, WeightedRanker

                # Each leg fetches more than top_k so the fusion has candidates from both sides.
                leg = max(top_k * 2, 10)
                if "params" in dense_params:
                    dense_params["params"] = {"ef": max(64, leg)}
                reqs = [
                    AnnSearchRequest(
                        data=[dense], anns_field="dense", param=dense_params, limit=leg, expr=filter or None
                    ),
                    AnnSearchRequest(
                        data=[question],
                        anns_field="sparse",
                        param={"metric_type": "BM25"},
                        limit=leg,
                        expr=filter or None,
                    ),
                ]
                ranker = (
                    WeightedRanker(dense_weight, 1.0 - dense_weight)
                    if fusion == "weighted"
                    else RRFRanker(rrf_k)
                )
                res = self.client.hybrid_search(
                    self.collection,
                    reqs,
                    ranker,
                    limit=top_k,
                    output_fields=fields,
                    consistency_level="Strong",
                )
            else:
                res = self.client.search(
                    self.collection,
                    data=[dense] if mode == "dense" else [question],
                    anns_field=mode,  # the field names are the mode names
                    limit=top_k,
                    filter=filter,
                    output_fields=fields,
                    search_params=dense_params if mode == "dense" else {"metric_type": "BM25"},
                    consistency_level="Strong",
                )
        hits = []
        for raw in res[0] if res else []:
            entity = raw.get("entity", {})
            score = float(raw["distance"])
            if mode == "sparse":
                # Milvus Lite reports BM25 as a distance (-score), a server as the score itself.
                score = abs(score)
            text = str(entity.get("text", ""))
            context = str(entity.get("context") or "")
            metadata = {k: entity.get(k) for k in METADATA_FIELDS if k in entity}
            if with_vectors and "dense" in entity:
                metadata["_vector"] = entity["dense"]
            hits.append(
                Hit(
                    chunk_id=str(entity.get("chunk_id", raw.get("chunk_id", raw.get("id")))),
                    source=str(entity.get("source", "")),
                    text=context or text,
                    page=int(entity.get("page") or 0),
                    score=score,
                    metadata=metadata,
                    matched=text if context else "",
                )
            )
        return hits


def choose_index_type(wanted: str, expected_rows: int, flat_below: int | None) -> str:
    """FLAT (exact, fastest to build) below ``flat_below`` rows, HNSW (graph, sub-linear) above."""
    if wanted in ("FLAT", "HNSW"):
        return wanted
    return "FLAT" if expected_rows < (flat_below or 20_000) else "HNSW"


def _first_line(message: str) -> str:
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else "unknown error"


@contextmanager
def open_store(uri: str, collection: str) -> Iterator[RagStore]:
    """Open a :class:`RagStore` and always close it (and release a Lite file's lock)."""
    store = RagStore(uri, collection)
    try:
        yield store
    finally:
        store.close()
