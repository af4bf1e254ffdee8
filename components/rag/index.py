"""The verbs of the RAG index, shared by the ``rag_index`` stage and ``posttrain rag``.

:func:`ingest` = hash files -> parse the changed ones (hidden HTML quarantined) -> clean ->
chunk -> drop exact and near duplicates -> embed -> replace each changed file's rows
(-> with ``prune``, delete the rows of files that are gone).

:func:`retrieve` = (expand the question) -> embed it -> search the store (-> rerank).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from components.errors import PosttrainError
from components.rag.chunking import Chunk, ChunkingConfig, chunk_elements, counter_for
from components.rag.embedding import Embedder
from components.rag.parsing import DEFAULT_LANGUAGES, Skipped, collect_files, parse_documents
from components.rag.store import Hit, RagStore, SearchMode

EXPANSIONS: tuple[str, ...] = ("none", "prf", "multi_query")
Rewriter = Callable[[str], list[str]]  # question -> other wordings of it (multi_query expansion)
PRF_DOCS = 3  # pseudo-relevance feedback: the first-pass hits read for expansion terms
PRF_TERMS = 6
PRF_DENSE_WEIGHT = 0.5  # Rocchio: question vector + this x mean of the feedback hits' vectors
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_]{2,}")
_STOP = frozenset(
    "the and for are but not you all any can had her was one our out has have with this that from they "
    "will would there their what when which who how why where its into than then them these those been "
    "also such may each other more most some only over very your about after before does did use used "
    "using should could must shall here just like per via".split()
)


@dataclass
class IngestReport:
    """What an ingest did, file by file and chunk by chunk (the stage's metrics and the CLI's report)."""

    indexed: dict[str, int] = field(default_factory=dict)  # source -> chunks now in the index
    unchanged: list[str] = field(default_factory=list)  # same bytes as indexed: not even parsed
    pruned: dict[str, int] = field(default_factory=dict)  # deleted files -> chunks removed
    skipped: list[Skipped] = field(default_factory=list)
    duplicates: list[dict[str, str]] = field(default_factory=list)
    quarantined: list[dict[str, str]] = field(default_factory=list)
    cleaning: dict[str, int] = field(default_factory=dict)
    added: int = 0
    updated: int = 0
    removed: int = 0

    @property
    def n_documents(self) -> int:
        return len(self.indexed)

    @property
    def n_chunks(self) -> int:
        return sum(self.indexed.values())

    def metrics(self) -> dict[str, Any]:
        """Counts plus the lists a user acts on (skipped files, dropped duplicates, quarantined text)."""
        return {
            "n_documents": self.n_documents,
            "n_chunks": self.n_chunks,
            "n_unchanged": len(self.unchanged),
            "chunks_added": self.added,
            "chunks_updated": self.updated,
            "chunks_removed": self.removed,
            "n_pruned_files": len(self.pruned),
            "n_duplicates": len(self.duplicates),
            "n_quarantined": len(self.quarantined),
            "n_skipped": len(self.skipped),
            "cleaning": dict(sorted(self.cleaning.items())),
            "skipped": [s.to_dict() for s in self.skipped],
            "duplicates": self.duplicates,
            "quarantined": self.quarantined,
        }


def index_record(embedder: Embedder, chunking: ChunkingConfig, **extra: Any) -> dict[str, Any]:
    """What a collection records about how it was built (checked on every later open)."""
    return {"embedding_model": embedder.name, "dim": embedder.dim, "chunking": chunking.to_dict(), **extra}


def file_hash(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_info(source: str, digest: str) -> dict[str, Any]:
    return {
        "file_type": Path(source).suffix.lower().lstrip(".") or "none",
        "modified": int(os.stat(source).st_mtime),
        "file_hash": digest,
    }


def _under(source: str, roots: Sequence[str]) -> bool:
    for root in roots:
        root = os.path.normpath(root)
        if source == root or source.startswith(root.rstrip(os.sep) + os.sep) or root == ".":
            return True
    return False


def ingest(
    paths: Sequence[str | os.PathLike[str]],
    store: RagStore,
    embedder: Embedder,
    *,
    chunking: ChunkingConfig | None = None,
    near_duplicate_threshold: float = 0.9,
    prune: bool = False,
    batch_size: int = 32,
    progress: bool = False,
    languages: Sequence[str] = DEFAULT_LANGUAGES,
    index_options: dict[str, Any] | None = None,
) -> IngestReport:
    """Index files and folders into ``store`` incrementally.

    A file whose bytes match what the index was built from is not parsed at all; a changed
    file has its rows replaced (only its own); with ``prune``, indexed files under ``paths``
    that no longer exist lose their rows. A file that fails to parse or yields no chunks is
    reported in ``skipped`` and its existing rows, if any, are left untouched: a bad upload
    never erases good content.
    """
    from components.rag.cleaning import CleaningStats, NearDuplicateIndex, clean_elements

    chunking = chunking or ChunkingConfig()
    chunking.validate()
    files, skipped = collect_files(paths)
    report = IngestReport(skipped=list(skipped))
    if not files and not prune:
        return report  # nothing to index: do not even create an empty collection
    record = index_record(embedder, chunking, **(index_options or {}))
    store.ensure_collection(record, expected_rows=len(files) * 8)
    known = store.file_hashes()

    digests = {source: file_hash(source) for source in files}
    changed = [s for s in files if known.get(s) != digests[s]]
    for source in files:
        if source not in changed:
            report.unchanged.append(source)
            report.indexed[source] = store.count(source)

    parsed = parse_documents(changed, languages, progress=progress) if changed else None
    counter = counter_for(embedder)
    dedupe = NearDuplicateIndex(threshold=near_duplicate_threshold)
    if changed and any(s not in changed for s in known):
        # What stays indexed counts too: a new copy of an unchanged file is a duplicate.
        changing = set(changed)
        for row in store.passages():
            if row["source"] not in changing:
                dedupe.add(f"{row['source']}#{row['chunk_id']}", row["text"])
    stats = CleaningStats(0, 0, 0)
    per_doc: list[tuple[str, list[Chunk]]] = []
    for doc in parsed.documents if parsed else []:
        for finding in doc.quarantined:
            report.quarantined.append({"source": doc.source, **finding.to_dict()})
        elements, doc_stats = clean_elements(doc.elements)
        stats = stats + doc_stats
        chunks = chunk_elements(doc.source, elements, chunking, counter, fallback_title=Path(doc.source).stem)
        kept = []
        for chunk in chunks:
            first = dedupe.add(f"{doc.source}#{chunk.index}", chunk.text)
            if first is None:
                kept.append(chunk)
            else:
                report.duplicates.append(
                    {"source": doc.source, "chunk_id": chunk.chunk_id, "duplicate_of": first}
                )
        if not kept:
            reason = "duplicate of already indexed text" if chunks else "no text left after cleaning"
            report.skipped.append(Skipped(doc.source, reason))
            continue
        per_doc.append((doc.source, kept))
    if parsed:
        report.skipped.extend(parsed.skipped)
    report.cleaning = stats.to_dict()

    all_chunks = [c for _, chunks in per_doc for c in chunks]
    vectors = embedder.encode(
        [c.embedding_text for c in all_chunks], batch_size=batch_size, progress=progress, cache=False
    )
    offset = 0
    for source, chunks in per_doc:
        before = store.chunk_hashes(source)
        after = {c.chunk_id: c.content_hash for c in chunks}
        report.added += sum(1 for k in after if k not in before)
        report.updated += sum(1 for k, h in after.items() if k in before and before[k] != h)
        report.removed += sum(1 for k in before if k not in after)
        block = vectors[offset : offset + len(chunks)]
        report.indexed[source] = store.replace_source(
            source, chunks, block, _file_info(source, digests[source])
        )
        offset += len(chunks)

    if prune:
        present = set(files)
        for source in store.sources():
            if source not in present and _under(source, [os.fspath(p) for p in paths]):
                n = store.delete_source(source)
                report.pruned[source] = n
                report.removed += n
    report.skipped.sort(key=lambda s: s.source)
    report.indexed = dict(sorted(report.indexed.items()))
    return report


# -- retrieval ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrievalOptions:
    """Query-time settings (``rag_index.top_k`` onwards in params.yaml)."""

    mode: SearchMode = "hybrid"
    top_k: int = 5
    filter: str = ""
    fusion: str = "rrf"
    rrf_k: int = 60
    dense_weight: float = 0.5
    expansion: str = "none"
    candidates: int = 50


def expansion_terms(question: str, texts: Sequence[str], n_terms: int = PRF_TERMS) -> list[str]:
    """Pseudo-relevance feedback terms: words frequent across the first hits, absent from the question.

    A word counts once per hit (document frequency among the feedback hits), so a term that
    recurs in several top hits ("ffi_prep_cif") beats one repeated in a single chunk.
    """
    asked = {w.lower() for w in _WORD.findall(question)}
    df: Counter[str] = Counter()
    for text in texts:
        df.update({w.lower() for w in _WORD.findall(text)} - asked - _STOP)
    ranked = sorted(df.items(), key=lambda kv: (-kv[1], kv[0]))
    return [w for w, n in ranked if n >= 2][:n_terms]


def fuse_rankings(rankings: Sequence[Sequence[Hit]], rrf_k: int) -> list[Hit]:
    """Reciprocal rank fusion of several ranked hit lists: sum over lists of 1 / (rrf_k + rank).

    Hits are the same chunk when source and chunk id match; the fused hit keeps the first
    list's copy (the question's own search comes first) with the fused score. Ties keep the
    order of first appearance.
    """
    fused: dict[tuple[str, str], tuple[Hit, float]] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, start=1):
            key = (hit.source, hit.chunk_id)
            first, score = fused.get(key, (hit, 0.0))
            fused[key] = (first, score + 1.0 / (rrf_k + rank))
    ordered = sorted(fused.values(), key=lambda pair: -pair[1])  # stable: first appearance on ties
    return [hit.with_score(score) for hit, score in ordered]


def retrieve(
    store: RagStore,
    embedder: Embedder | None,
    question: str,
    options: RetrievalOptions | None = None,
    *,
    reranker: Any = None,
    vector: np.ndarray | None = None,
    rewriter: Rewriter | None = None,
) -> list[Hit]:
    """The ``top_k`` chunks that best answer ``question``, best first.

    ``embedder`` may be None for ``sparse`` mode, which saves loading the model (seconds).
    With a ``reranker`` (:class:`components.rag.rerank.Reranker`), ``candidates`` hits are
    retrieved cheaply and the cross-encoder keeps the best ``top_k``. ``expansion="prf"``
    searches twice: the first hits' shared terms extend the BM25 query and their vectors pull
    the question's (Rocchio), which helps a question worded unlike the document.
    ``expansion="multi_query"`` asks ``rewriter`` (a generator) for other wordings of the
    question (and a hypothetical answer), searches each (the question itself first) and fuses
    the lists with RRF (``rrf_k``): a chunk that several wordings find rises, one that only a
    bad rewrite finds stays low.
    """
    opts = options or RetrievalOptions()
    if opts.expansion not in EXPANSIONS:
        raise PosttrainError(
            f"unknown query expansion {opts.expansion!r} (choose from {', '.join(EXPANSIONS)})"
        )
    if embedder is None and opts.mode != "sparse":
        raise ValueError(f"{opts.mode} search needs an embedder")
    if vector is None and embedder is not None and opts.mode != "sparse":
        vector = embedder.encode([question])[0]
    limit = max(opts.candidates, opts.top_k) if reranker is not None else opts.top_k
    kwargs = {
        "filter": opts.filter,
        "fusion": opts.fusion,
        "rrf_k": opts.rrf_k,
        "dense_weight": opts.dense_weight,
    }
    query_text = question
    if opts.expansion == "prf":
        first = store.search(question, vector, mode=opts.mode, top_k=PRF_DOCS, with_vectors=True, **kwargs)
        terms = expansion_terms(question, [h.matched or h.text for h in first])
        query_text = " ".join([question, *terms])
        feedback = [h.metadata.get("_vector") for h in first if h.metadata.get("_vector") is not None]
        if vector is not None and feedback:
            moved = np.asarray(vector, dtype=np.float32) + PRF_DENSE_WEIGHT * np.mean(
                np.asarray(feedback), axis=0
            )
            vector = moved / (np.linalg.norm(moved) or 1.0)
    if opts.expansion == "multi_query":
        if rewriter is None:
            raise PosttrainError(
                "rag_index.expansion: multi_query needs a generator to rewrite the question "
                "(rag_index.generator); expansion: prf needs none"
            )
        queries = [question, *rewriter(question)]
        vectors: list[Any] = [vector] + [None] * (len(queries) - 1)
        if vector is not None and embedder is not None and len(queries) > 1:
            vectors[1:] = list(embedder.encode(queries[1:]))
        rankings = [
            store.search(q, v, mode=opts.mode, top_k=limit, **kwargs)
            for q, v in zip(queries, vectors, strict=True)
        ]
        hits = fuse_rankings(rankings, opts.rrf_k)[:limit]
    else:
        hits = store.search(query_text, vector, mode=opts.mode, top_k=limit, **kwargs)
    if reranker is not None and hits:
        ranked = reranker.rerank(question, hits, lambda h: h.matched or h.text, opts.top_k)
        hits = [hit.with_score(score) for hit, score in ranked]
    return hits[: opts.top_k]
