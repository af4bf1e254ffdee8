"""Split a document's cleaned elements into retrieval chunks with stable ids and metadata.

Three chunkers, chosen by ``rag_index.chunking``; every size is in tokens of the embedding
model (MiniLM reads at most 256 word pieces and silently drops the rest, so a character
budget can hide truncation):

``by_title``
    unstructured's ``chunk_by_title``: a heading starts a new chunk and stays with its text,
    so a chunk reads as a unit. Pieces still over ``chunk_tokens`` are cut by the fixed
    splitter.
``fixed``
    windows of ``chunk_tokens`` tokens over the whole document text, each overlapping the
    previous by ``chunk_overlap_tokens``: structure-blind, the classic baseline.
``sentence_window``
    each sentence is its own row (what is embedded and matched: small units are precise),
    and carries ``context``, its neighbourhood of ``window_sentences`` sentences each side in
    the same section (what the reader gets: enough to understand the sentence).

Every chunk keeps its document title, section path ("Using libffi > The Basics") and page.
The chunk id is a hash of the source path and the chunk's position: re-ingesting a file
produces the same ids, so the store can compare content hashes and write only what changed.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from components.errors import PosttrainError

ChunkingMethod = Literal["by_title", "fixed", "sentence_window"]
CHUNKING_METHODS: tuple[str, ...] = ("by_title", "fixed", "sentence_window")
# Milvus VARCHAR fields hold at most 65,535 bytes; 16,000 characters stay below that even
# when every character takes four bytes in UTF-8.
MAX_CHUNK_CHARACTERS = 16_000
MAX_CHUNK_TOKENS = 2048
# unstructured's by_title chunker counts characters; English word pieces average ~4.5 of them,
# so this many characters per token lets a chunk fill its token budget before the cap cuts it.
CHARS_PER_TOKEN = 5
SECTION_SEPARATOR = " > "


@dataclass(frozen=True)
class ChunkingConfig:
    """How to chunk (sizes in embedding-model tokens); part of what an index records about itself."""

    method: ChunkingMethod = "by_title"
    chunk_tokens: int = 128
    overlap_tokens: int = 16
    window_sentences: int = 2

    def validate(self) -> None:
        """Check sizes up front, naming the params key, so a bad config fails before parsing."""
        if self.method not in CHUNKING_METHODS:
            raise PosttrainError(
                f"rag_index.chunking must be one of {', '.join(CHUNKING_METHODS)}, got {self.method!r}"
            )
        if not 8 <= self.chunk_tokens <= MAX_CHUNK_TOKENS:
            raise PosttrainError(
                f"rag_index.chunk_tokens must be between 8 and {MAX_CHUNK_TOKENS}, got {self.chunk_tokens}"
            )
        if not 0 <= self.overlap_tokens < self.chunk_tokens:
            raise PosttrainError(
                "rag_index.chunk_overlap_tokens must be >= 0 and smaller than chunk_tokens "
                f"({self.chunk_tokens}), got {self.overlap_tokens}"
            )
        if self.window_sentences < 0:
            raise PosttrainError(f"rag_index.window_sentences must be >= 0, got {self.window_sentences}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "chunk_tokens": self.chunk_tokens,
            "overlap_tokens": self.overlap_tokens,
            "window_sentences": self.window_sentences,
        }


@dataclass(frozen=True)
class Chunk:
    """One row of the index. ``page`` is 1-based, or 0 when the format has no pages.

    ``text`` is what is embedded and matched by BM25; ``context`` (sentence_window only) is
    the neighbourhood returned to the reader instead of the bare sentence.
    """

    chunk_id: str
    source: str
    index: int
    text: str
    page: int
    title: str = ""
    section: str = ""
    context: str = ""

    @property
    def content_hash(self) -> str:
        """What the store compares to decide whether a re-ingested chunk changed."""
        payload = "\x00".join((self.text, self.context, self.title, self.section, str(self.page)))
        return hashlib.sha256(payload.encode()).hexdigest()

    @property
    def embedding_text(self) -> str:
        """The text given to the embedder: the chunk under its document title and section.

        A chunk that says "It returns FFI_OK on success" is findable only with the heading
        that says which function "it" is; BM25 still sees the bare text.
        """
        header = SECTION_SEPARATOR.join(p for p in (self.title, self.section) if p and p not in self.text)
        return f"{header}\n{self.text}" if header else self.text

    @property
    def reader_text(self) -> str:
        return self.context or self.text


class TokenCounter:
    """Counts and cuts text in tokens of one tokenizer (the embedding model's)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def windows(self, text: str, size: int, overlap: int) -> list[tuple[int, int]]:
        """Character spans of consecutive windows of at most ``size`` tokens, ``overlap`` tokens back.

        Spans come from the tokenizer's offsets and are snapped to word boundaries (a window
        never starts or ends inside a word, so the slice re-tokenizes to at most ``size``
        tokens); the chunk text is an exact slice of the original.
        """
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        n = len(offsets)
        if n <= size:
            return [(0, len(text))] if text.strip() else []
        words = enc.word_ids() if hasattr(enc, "word_ids") else list(range(n))

        def word_start(i: int) -> int:
            while 0 < i < n and words[i] is not None and words[i - 1] == words[i]:
                i -= 1
            return i

        spans = []
        start = 0
        while start < n:
            end = min(start + size, n)
            if end < n:
                snapped = word_start(end)
                end = snapped if snapped > start else end  # a single word longer than the window is cut
            spans.append((offsets[start][0], offsets[end - 1][1]))
            if end == n:
                break
            nxt = word_start(max(end - overlap, start + 1))
            start = nxt if nxt > start else end
        return spans


def make_chunk_id(source: str, index: int) -> str:
    """A 32-hex-digit id that depends only on the source path and the chunk's position."""
    return hashlib.sha256(f"{source}\x00{index}".encode()).hexdigest()[:32]


# -- structure: title and section path per element --------------------------------------------


@dataclass(frozen=True)
class _Located:
    text: str
    page: int
    section: str
    is_title: bool


def _page(element: Any) -> int:
    return int(getattr(element.metadata, "page_number", None) or 0)


def locate(elements: Sequence[Any]) -> tuple[str, list[_Located]]:
    """The document title and each element's section path, from its headings' depths.

    unstructured gives Title elements a ``category_depth`` (0 = top) for HTML, Markdown and
    DOCX; a heading replaces the stack entries at or below its depth. PDFs have no depths, so
    each heading is a section of its own.
    """
    title = ""
    stack: list[tuple[int, str]] = []
    out: list[_Located] = []
    for element in elements:
        text = (element.text or "").strip()
        is_title = getattr(element, "category", "") == "Title"
        if is_title:
            depth = getattr(element.metadata, "category_depth", None)
            depth = int(depth) if depth is not None else 0
            title = title or text
            while stack and stack[-1][0] >= depth:
                stack.pop()
            stack.append((depth, text))
        # The document title itself is not repeated in every section path.
        path = [t for _, t in stack if t != title]
        out.append(_Located(text, _page(element), SECTION_SEPARATOR.join(path), is_title))
    return title, out


# -- the three chunkers ------------------------------------------------------------------------


def _cap(text: str, counter: TokenCounter, cfg: ChunkingConfig) -> list[str]:
    """``text`` as is, or cut into token windows when it exceeds ``chunk_tokens``."""
    spans = counter.windows(text, cfg.chunk_tokens, cfg.overlap_tokens)
    return [text[a:b].strip() for a, b in spans if text[a:b].strip()]


def _by_title(elements: Sequence[Any], located: list[_Located], counter: TokenCounter, cfg: ChunkingConfig):
    from unstructured.chunking.title import chunk_by_title

    where = {e.id: loc for e, loc in zip(elements, located, strict=True)}
    max_chars = min(cfg.chunk_tokens * CHARS_PER_TOKEN, MAX_CHUNK_CHARACTERS)
    # combine_text_under_n_chars=0: every heading starts a chunk, even after a short section
    # (unstructured would otherwise merge small sections, and a chunk would span two headings).
    pieces = chunk_by_title(list(elements), max_characters=max_chars, overlap=0, combine_text_under_n_chars=0)
    for piece in pieces:
        text = (piece.text or "").strip()
        if not text:
            continue
        origin = [where[o.id] for o in (piece.metadata.orig_elements or []) if o.id in where]
        # The section of a piece is that of its first body element (a heading opens its section).
        body = [loc for loc in origin if not loc.is_title] or origin
        section = body[0].section if body else ""
        page = _page(piece) or (origin[0].page if origin else 0)
        for part in _cap(text, counter, cfg):
            yield part, page, section, ""


def _fixed(located: list[_Located], counter: TokenCounter, cfg: ChunkingConfig):
    starts, parts, pos = [], [], 0
    for loc in located:
        starts.append(pos)
        parts.append(loc.text)
        pos += len(loc.text) + 2
    full = "\n\n".join(parts)
    for a, b in counter.windows(full, cfg.chunk_tokens, cfg.overlap_tokens):
        text = full[a:b].strip()
        if text:
            loc = located[max(0, bisect.bisect_right(starts, a) - 1)]
            yield text, loc.page, loc.section, ""


def _sentence_window(located: list[_Located], counter: TokenCounter, cfg: ChunkingConfig):
    from components.rag.answer import split_sentences

    # Sentences grouped by section, so a window never reaches into the next heading's text.
    groups: list[list[tuple[str, _Located]]] = []
    for loc in located:
        if loc.is_title or not groups or groups[-1][0][1].section != loc.section:
            groups.append([])
        for sentence in split_sentences(loc.text):
            for part in _cap(sentence, counter, cfg):
                groups[-1].append((part, loc))
    w = cfg.window_sentences
    for group in groups:
        for i, (sentence, loc) in enumerate(group):
            if loc.is_title and len(group) > 1:
                continue  # a heading alone is not a passage; it is the next sentences' context
            window = " ".join(s for s, _ in group[max(0, i - w) : i + w + 1])
            yield sentence, loc.page, loc.section, window if window != sentence else ""


def chunk_elements(
    source: str,
    elements: Sequence[Any],
    cfg: ChunkingConfig,
    counter: TokenCounter,
    *,
    fallback_title: str = "",
) -> list[Chunk]:
    """Chunk one document's elements with ``cfg.method``; empty chunks are dropped before numbering."""
    cfg.validate()
    title, located = locate(elements)
    title = title or fallback_title
    if cfg.method == "by_title":
        pieces = _by_title(elements, located, counter, cfg)
    elif cfg.method == "fixed":
        pieces = _fixed(located, counter, cfg)
    else:
        pieces = _sentence_window(located, counter, cfg)
    chunks: list[Chunk] = []
    for text, page, section, context in pieces:
        index = len(chunks)
        chunks.append(
            Chunk(
                chunk_id=make_chunk_id(source, index),
                source=source,
                index=index,
                text=text[:MAX_CHUNK_CHARACTERS],
                page=int(page),
                title=title,
                section=section,
                context=context[:MAX_CHUNK_CHARACTERS],
            )
        )
    return chunks


def counter_for(embedder: Any) -> TokenCounter:
    """The token counter of a :class:`~components.rag.embedding.Embedder` (its own tokenizer)."""
    return TokenCounter(embedder.model.tokenizer)
