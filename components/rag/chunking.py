"""Split a document's elements into retrieval chunks with stable ids.

``chunk_by_title`` keeps a section's heading with its text and starts a new chunk at each
heading, so a retrieved chunk reads as a unit ("Lubaa — Filulo ... charges no visa fee")
rather than an arbitrary window. The chunk id is a hash of the source path and the chunk's
position: ingesting the same file again produces the same ids, so the store can replace a
document's chunks in place instead of adding copies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from components.errors import PosttrainError

# Milvus VARCHAR fields hold at most 65,535 bytes; 16,000 characters stay below that even
# when every character takes four bytes in UTF-8.
MAX_CHUNK_CHARACTERS = 16_000


@dataclass(frozen=True)
class Chunk:
    """One unit of retrieval. ``page`` is 1-based, or 0 when the format has no pages."""

    chunk_id: str
    source: str
    index: int
    text: str
    page: int


def make_chunk_id(source: str, index: int) -> str:
    """A 32-hex-digit id that depends only on the source path and the chunk's position."""
    return hashlib.sha256(f"{source}\x00{index}".encode()).hexdigest()[:32]


def validate_chunking(max_characters: int, overlap: int) -> None:
    """Check the chunk sizes up front so a bad ``params.yaml`` fails before any parsing."""
    if not 1 <= max_characters <= MAX_CHUNK_CHARACTERS:
        raise PosttrainError(
            f"rag_index.chunk_max_characters must be between 1 and {MAX_CHUNK_CHARACTERS}, "
            f"got {max_characters}"
        )
    if not 0 <= overlap < max_characters:
        raise PosttrainError(
            f"rag_index.chunk_overlap must be >= 0 and smaller than chunk_max_characters "
            f"({max_characters}), got {overlap}"
        )


def chunk_elements(source: str, elements: Sequence[Any], max_characters: int, overlap: int) -> list[Chunk]:
    """Chunk one document's elements by title; empty chunks are dropped before numbering."""
    from unstructured.chunking.title import chunk_by_title

    validate_chunking(max_characters, overlap)
    pieces = chunk_by_title(list(elements), max_characters=max_characters, overlap=overlap)
    chunks: list[Chunk] = []
    for piece in pieces:
        text = (piece.text or "").strip()
        if not text:
            continue
        page = getattr(piece.metadata, "page_number", None) or 0
        index = len(chunks)
        chunks.append(Chunk(make_chunk_id(source, index), source, index, text, int(page)))
    return chunks
