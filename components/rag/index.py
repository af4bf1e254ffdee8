"""The two verbs of the RAG index, shared by the ``rag_index`` stage and ``posttrain rag``.

:func:`ingest` = parse -> chunk -> embed -> replace each file's rows in the store.
:func:`retrieve` = embed the question -> search the store.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from components.rag.chunking import Chunk, chunk_elements, validate_chunking
from components.rag.embedding import Embedder
from components.rag.parsing import DEFAULT_LANGUAGES, Skipped, parse_documents
from components.rag.store import Hit, RagStore, SearchMode


@dataclass
class IngestReport:
    """What an ingest did: files indexed (with their chunk counts) and files skipped, with reasons."""

    indexed: dict[str, int] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def n_documents(self) -> int:
        return len(self.indexed)

    @property
    def n_chunks(self) -> int:
        return sum(self.indexed.values())

    def metrics(self) -> dict[str, Any]:
        """The stage's metrics: counts plus the skipped files (DVC and MLflow keep the numbers)."""
        return {
            "n_documents": self.n_documents,
            "n_chunks": self.n_chunks,
            "n_skipped": len(self.skipped),
            "skipped": [s.to_dict() for s in self.skipped],
        }


def ingest(
    paths: Sequence[str | os.PathLike[str]],
    store: RagStore,
    embedder: Embedder,
    *,
    max_characters: int = 500,
    overlap: int = 50,
    batch_size: int = 32,
    progress: bool = False,
    languages: Sequence[str] = DEFAULT_LANGUAGES,
) -> IngestReport:
    """Index files and folders into ``store``; a file already indexed is replaced, not duplicated.

    Chunks of all files are embedded in one pass (one progress bar, full batches), then each
    file's rows are replaced. A file that fails to parse or yields no chunks is reported in
    ``skipped`` and its existing rows, if any, are left untouched.
    """
    validate_chunking(max_characters, overlap)
    store.ensure_collection(embedder.dim)
    parsed = parse_documents(paths, languages, progress=progress)
    report = IngestReport(skipped=list(parsed.skipped))
    per_doc: list[tuple[str, list[Chunk]]] = []
    for doc in parsed.documents:
        chunks = chunk_elements(doc.source, doc.elements, max_characters, overlap)
        if not chunks:
            report.skipped.append(Skipped(doc.source, "no text left after chunking"))
            continue
        per_doc.append((doc.source, chunks))
    all_chunks = [c for _, chunks in per_doc for c in chunks]
    vectors = embedder.encode([c.text for c in all_chunks], batch_size=batch_size, progress=progress)
    offset = 0
    for source, chunks in per_doc:
        report.indexed[source] = store.replace_source(source, chunks, vectors[offset : offset + len(chunks)])
        offset += len(chunks)
    report.skipped.sort(key=lambda s: s.source)
    return report


def retrieve(
    store: RagStore, embedder: Embedder | None, question: str, *, mode: SearchMode = "hybrid", top_k: int = 5
) -> list[Hit]:
    """The ``top_k`` chunks that best answer ``question``, best first.

    ``embedder`` may be None for ``sparse`` mode, which saves loading the model (seconds).
    """
    if embedder is None and mode != "sparse":
        raise ValueError(f"{mode} search needs an embedder")
    vector = embedder.encode([question])[0] if embedder is not None and mode != "sparse" else None
    return store.search(question, vector, mode=mode, top_k=top_k)
