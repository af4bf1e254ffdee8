"""Clean parsed elements before chunking, and find (near-)duplicate chunks and documents.

Text extracted by unstructured carries noise that hurts retrieval: PDF running headers and
footers repeated on every page ("Chapter 3 — Installing  17"), HTML navigation chrome
("« Previous | Next »", texinfo's "Next: Types, Previous: Introduction, Up: ..."), bare page
numbers, non-breaking and zero-width spaces, and words hyphenated across line breaks. Left in,
that noise becomes chunks of its own (a retrieved "Next »" wastes a context slot) or dilutes real
chunks, and it changes embeddings and BM25 terms without carrying content. Everything here is a
pure function of the text, so cleaning is deterministic and cheap to re-run.

Duplicates are a separate problem: mirrored manuals, copies of the same page under two names,
a README vendored into several folders. :func:`content_hash` catches exact copies (whitespace
reformatting does not change it) and :class:`NearDuplicateIndex` catches near copies with MinHash
over word shingles and LSH banding, so checking one more chunk costs about the same whatever the
size of the index. All hashing is seeded and uses ``hashlib`` (never Python's per-process
randomized ``hash()``), so two runs flag the same duplicates.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np

# --- whitespace ------------------------------------------------------------------------------

# Unicode spaces that extraction leaves in text (NBSP, narrow NBSP, en/em/thin spaces, ...):
# they become ordinary spaces, so "10\u00a0km" and "10 km" index the same.
_UNICODE_SPACES_RE = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000\t]")
# Invisible characters removed outright: zero-width space, word joiner, BOM. Zero-width
# (non-)joiners (U+200C, U+200D) are kept: they change spelling in Persian and Indic scripts
# and hold emoji sequences together.
_ZERO_WIDTH_RE = re.compile("[\u200b\u2060\ufeff]")
_LINE_BREAKS_RE = re.compile("\r\n|[\r\f\v\x85\u2028\u2029]")
_SOFT_HYPHEN_BREAK_RE = re.compile("\u00ad[ \t]*\n[ \t]*")
_SPACES_RE = re.compile(r" {2,}")
# A hyphen (ASCII or U+2010) ending a line between two letters; whether it is joined depends on
# both letters being lowercase (checked in _dehyphenate).
_LINE_END_HYPHEN_RE = re.compile(r"(?<=[^\W\d_])[-\u2010]\n(?=[^\W\d_])")
_BLANK_LINES_RE = re.compile(r"\n{3,}")


def _dehyphenate(match: re.Match[str]) -> str:
    before, after = match.string[match.start() - 1], match.string[match.end()]
    return "" if before.islower() and after.islower() else match.group()


def normalize_whitespace(text: str) -> str:
    """Normalise spaces and line breaks without changing the words.

    Unicode spaces (NBSP and friends) and tabs become spaces; zero-width spaces, word joiners,
    BOMs and soft hyphens are removed (a soft hyphen at a line end joins the two halves); runs of
    spaces collapse to one; every line is stripped; a word hyphenated across a line break is
    joined ("infor-\\nmation" -> "information") only when the letters on both sides are
    lowercase, so "Jean-\\nPaul" and "COVID-\\n19" keep their hyphen; more than one blank line
    collapses to one. The cost of the rule: a compound broken at its own hyphen ("well-\\nknown")
    loses it.
    """
    text = _LINE_BREAKS_RE.sub("\n", text)
    text = _ZERO_WIDTH_RE.sub("", text)
    text = _SOFT_HYPHEN_BREAK_RE.sub("", text).replace("\u00ad", "")
    text = _UNICODE_SPACES_RE.sub(" ", text)
    text = _SPACES_RE.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    text = _LINE_END_HYPHEN_RE.sub(_dehyphenate, text)
    text = _BLANK_LINES_RE.sub("\n\n", text)
    return text.strip()


def _canonical(text: str) -> str:
    """Whitespace-normalised text on one line: the form that hashing and matching compare."""
    return " ".join(normalize_whitespace(text).split())


# --- boilerplate -----------------------------------------------------------------------------

# Navigation and page-chrome phrases. An element is boilerplate when its whole text is one or
# more of these, separated only by punctuation, arrows, pipes or brackets ("« Previous | Next »",
# "[Contents][Index]", "↑ Back to top"). Matching is case-insensitive and whole-element only: a
# paragraph that merely contains "next" or "index" is content.
BOILERPLATE_PHRASES: tuple[str, ...] = (
    "next",
    "next page",
    "next topic",
    "next chapter",
    "previous",
    "previous page",
    "previous topic",
    "previous chapter",
    "prev",
    "up",
    "home",
    "top",
    "back to top",
    "return to top",
    "skip to content",
    "skip to main content",
    "skip navigation",
    "table of contents",
    "contents",
    "print this page",
    "print this chapter",
    "printer-friendly version",
    "edit on github",
    "edit this page",
    "view page source",
    "show source",
    "report a bug",
    "index",
    "search",
)

# Elements longer than this are never boilerplate (texinfo navigation is the longest chrome).
BOILERPLATE_MAX_CHARACTERS = 300

# Separators allowed around and between navigation phrases.
_SEPARATOR = r"[\s|«»‹›<>←→↑↓⇐⇒⇑^·•/\\()\[\]{}:;,.\-–—=*~¶#]"
_PHRASE = "|".join(
    r"\s+".join(re.escape(word) for word in phrase.split())
    for phrase in sorted(BOILERPLATE_PHRASES, key=len, reverse=True)
)
# A texinfo navigation field ("Next: Types"); node names cannot contain commas or brackets.
_TEXINFO_FIELD = r"(?:next|prev(?:ious)?|up)\s*:\s*[^,\[\]]{1,80}?"
_TEXINFO_TRAILER = r"(?:\[\s*(?:contents|index)\s*\]\s*)"

# Structural patterns, each matched against the whole element (whitespace collapsed):
BOILERPLATE_PATTERNS: tuple[str, ...] = (
    # one or more navigation phrases between separators: "Next", "« Previous | Next »"
    rf"{_SEPARATOR}*(?:{_PHRASE})(?:{_SEPARATOR}+(?:{_PHRASE}))*{_SEPARATOR}*",
    # texinfo (GNU HTML manuals): "Next: Types, Previous: Introduction, Up: Using libffi
    # [Contents][Index]"; two fields, or one with the [Contents]/[Index] trailer, so a sentence
    # starting "Next: ..." is not caught
    rf"{_TEXINFO_FIELD}(?:\s*,\s*{_TEXINFO_FIELD})+\s*{_TEXINFO_TRAILER}*",
    rf"{_TEXINFO_FIELD}\s*{_TEXINFO_TRAILER}+",
    # "Page 3", "Page 3 of 12", "p. 3", "3 of 12", "3/12"
    r"(?:page|pg\.?|p\.)\s*\d{1,4}(?:\s*(?:of|/)\s*\d{1,4})?",
    r"\d{1,4}\s*(?:of|/)\s*\d{1,4}",
    # a bare page number, possibly dashed ("17", "- 17 -"); at most three digits, so a year
    # heading such as "1801" stays
    r"[-–—]?\s*\d{1,3}\s*[-–—]?",
    # punctuation, arrows and pipes only: "|", "»", "* * *"
    r"[\W_]+",
)
_BOILERPLATE_RE = re.compile("|".join(f"(?:{p})" for p in BOILERPLATE_PATTERNS), re.IGNORECASE)


def is_boilerplate(text: str) -> bool:
    """True when the whole text is navigation or page chrome (see :data:`BOILERPLATE_PATTERNS`).

    Empty text is not boilerplate (it is "empty"); text longer than
    :data:`BOILERPLATE_MAX_CHARACTERS` never is.
    """
    flat = _canonical(text)
    if not flat or len(flat) > BOILERPLATE_MAX_CHARACTERS:
        return False
    return _BOILERPLATE_RE.fullmatch(flat) is not None


# --- running headers and footers -------------------------------------------------------------

_DIGITS_RE = re.compile(r"\d+")


def line_key(line: str) -> str:
    """The form under which a line repeats across pages: whitespace collapsed, lowercased,
    and every run of digits replaced by one ``#`` ("Page 9" and "Page 10" are both "page #")."""
    return _DIGITS_RE.sub("#", _canonical(line)).lower()


def repeated_lines(pages: Sequence[Sequence[str]], min_pages: int = 3, share: float = 0.5) -> set[str]:
    """Line keys (:func:`line_key`) that occur on at least ``min_pages`` pages and at least
    ``share`` of all pages: running headers and footers such as "libtasn1 manual   page 4".

    A line repeated on one page counts once for that page.
    """
    counts: dict[str, int] = {}
    for page in pages:
        for key in {line_key(line) for line in page}:
            if key:
                counts[key] = counts.get(key, 0) + 1
    needed = max(min_pages, share * len(pages))
    return {key for key, count in counts.items() if count >= needed}


# --- cleaning elements -----------------------------------------------------------------------

# unstructured categories that are page furniture by construction.
PAGE_EDGE = 2  # elements at each end of a page that may be a running header or footer
HEADER_FOOTER_CATEGORIES: frozenset[str] = frozenset({"Header", "Footer", "PageNumber"})


@dataclass
class CleaningStats:
    """How many elements :func:`clean_elements` dropped, by reason; stats of several files add up."""

    boilerplate: int = 0
    headers_footers: int = 0
    empty: int = 0

    @property
    def dropped(self) -> int:
        return self.boilerplate + self.headers_footers + self.empty

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def __add__(self, other: CleaningStats) -> CleaningStats:
        if not isinstance(other, CleaningStats):
            return NotImplemented
        return CleaningStats(
            boilerplate=self.boilerplate + other.boilerplate,
            headers_footers=self.headers_footers + other.headers_footers,
            empty=self.empty + other.empty,
        )

    def __radd__(self, other: object) -> CleaningStats:
        if other == 0:  # so the builtin sum() works without a start value
            return self
        return NotImplemented


def _page_number(element: Any) -> int | None:
    return getattr(getattr(element, "metadata", None), "page_number", None)


def clean_elements(
    elements: Sequence[Any], min_pages: int = 3, share: float = 0.5
) -> tuple[list[Any], CleaningStats]:
    """Clean one document's unstructured elements; returns the kept ones, in order, and counts.

    Each element's ``text`` is replaced by :func:`normalize_whitespace` of it (the elements are
    modified in place). Then, in this order, an element is dropped as ``empty`` when no text is
    left, as ``boilerplate`` when :func:`is_boilerplate`, and as ``headers_footers`` when its
    category is Header, Footer or PageNumber or, for documents with page numbers, when its
    :func:`line_key` is among :func:`repeated_lines` of the per-page texts (``min_pages`` and
    ``share`` are passed on). Repeated content within a document is otherwise kept.
    """
    stats = CleaningStats()
    candidates: list[Any] = []
    by_page: dict[int, list[Any]] = {}
    for element in elements:
        text = normalize_whitespace(getattr(element, "text", None) or "")
        element.text = text
        if not text:
            stats.empty += 1
            continue
        page = _page_number(element)
        if page is not None:
            by_page.setdefault(page, []).append(element)
        if is_boilerplate(text):
            stats.boilerplate += 1
        elif getattr(element, "category", None) in HEADER_FOOTER_CATEGORIES:
            stats.headers_footers += 1
        else:
            candidates.append(element)
    # Running headers and footers sit at a page's edges: only the first and last PAGE_EDGE
    # elements of each page are compared, so a numbered heading that happens to open half the
    # pages' bodies ("Section 3") is not mistaken for one.
    edges = {page: [*els[:PAGE_EDGE], *els[PAGE_EDGE:][-PAGE_EDGE:]] for page, els in by_page.items()}
    pages = [[e.text for e in els] for els in edges.values()]
    repeated = repeated_lines(pages, min_pages, share) if pages else set()
    at_edge = {id(e) for els in edges.values() for e in els}
    kept: list[Any] = []
    for element in candidates:
        if repeated and id(element) in at_edge and line_key(element.text) in repeated:
            stats.headers_footers += 1
        else:
            kept.append(element)
    return kept, stats


# --- duplicates ------------------------------------------------------------------------------


def content_hash(text: str) -> str:
    """sha256 hex digest of the text with its whitespace normalised (reflowing lines, NBSPs
    or doubled spaces do not change it; any change to a word does)."""
    return hashlib.sha256(_canonical(text).encode("utf-8")).hexdigest()


_WORD_RE = re.compile(r"\w+")
_SIGNATURE_BLOCK = 8192  # shingles hashed against all permutations at once (bounds memory)


def _shingles(text: str, size: int) -> set[str]:
    """Word ``size``-grams of the lowercased text (punctuation ignored); a text shorter than
    ``size`` words is one shingle; a text without words has none."""
    words = _WORD_RE.findall(_canonical(text).lower())
    if not words:
        return set()
    if len(words) < size:
        return {" ".join(words)}
    return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


def jaccard(a: str, b: str, shingle: int = 5) -> float:
    """Exact Jaccard similarity of the two texts' word-shingle sets (1.0 when both have none)."""
    sa, sb = _shingles(a, shingle), _shingles(b, shingle)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


@lru_cache(maxsize=16)
def _coefficients(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-permutation multipliers and offsets, derived from ``seed`` with blake2b (stable
    across processes, platforms and numpy versions)."""

    def draw(tag: str, i: int) -> int:
        digest = hashlib.blake2b(f"minhash:{seed}:{tag}:{i}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little")

    a = np.array([draw("a", i) for i in range(num_perm)], dtype=np.uint64)
    b = np.array([draw("b", i) for i in range(num_perm)], dtype=np.uint64)
    return a[:, None], b[:, None]


def _signature(shingles: set[str], num_perm: int, seed: int) -> np.ndarray | None:
    """MinHash signature (``num_perm`` uint32 values), or None for an empty shingle set.

    Each shingle is hashed to 32 bits with blake2b; permutation ``i`` is the multiply-add-shift
    hash ``((a_i * x + b_i) mod 2**64) >> 32``, a strongly universal family for 32-bit keys
    (numpy's uint64 arithmetic wraps modulo 2**64 on arrays, which is the modulus wanted).
    """
    if not shingles:
        return None
    x = np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=4).digest(), "little")
            for s in shingles
        ),
        dtype=np.uint64,
        count=len(shingles),
    )
    a, b = _coefficients(num_perm, seed)
    shift = np.uint64(32)
    signature = np.full(num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
    for start in range(0, len(x), _SIGNATURE_BLOCK):
        block = x[None, start : start + _SIGNATURE_BLOCK]
        np.minimum(signature, ((a * block + b) >> shift).min(axis=1), out=signature)
    return signature.astype(np.uint32)


def _similarity(sig_a: np.ndarray | None, sig_b: np.ndarray | None) -> float:
    if sig_a is None or sig_b is None:
        return 1.0 if sig_a is None and sig_b is None else 0.0
    return float(np.count_nonzero(sig_a == sig_b)) / len(sig_a)


def estimate_jaccard(a: str, b: str, num_perm: int = 64, shingle: int = 5, seed: int = 0) -> float:
    """Jaccard similarity of the two texts' shingle sets as estimated by MinHash (the share of
    equal signature values), with the same hashing as :class:`NearDuplicateIndex`."""
    return _similarity(
        _signature(_shingles(a, shingle), num_perm, seed), _signature(_shingles(b, shingle), num_perm, seed)
    )


def _bands_for(num_perm: int, threshold: float) -> tuple[int, int]:
    """LSH ``(bands, rows)`` with ``bands * rows == num_perm``: the most rows per band (fewest
    spurious candidates) such that a pair exactly at ``threshold`` still shares a band with
    probability >= 0.99; candidates are then confirmed against the threshold on the whole
    signature. For 64 permutations and 0.85 this is 16 bands of 4 rows."""
    for rows in range(num_perm, 0, -1):
        if num_perm % rows:
            continue
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= 0.99:
            return bands, rows
    return num_perm, 1


class NearDuplicateIndex:
    """Keeps the first of each group of near-duplicate texts (chunks or whole documents).

    :meth:`add` first looks the text up by :func:`content_hash` (exact copies), then by MinHash
    over word shingles: the signature is cut into LSH bands, texts that share a band are
    candidates, and a candidate is a duplicate when the estimated Jaccard similarity over the
    whole signature is at least ``threshold``. Results depend only on the texts, their order
    and ``seed``.
    """

    def __init__(self, threshold: float = 0.85, num_perm: int = 64, shingle: int = 5, seed: int = 0):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if num_perm < 1 or shingle < 1:
            raise ValueError(f"num_perm and shingle must be >= 1, got {num_perm} and {shingle}")
        self.threshold = threshold
        self.num_perm = num_perm
        self.shingle = shingle
        self.seed = seed
        self.bands, self.rows = _bands_for(num_perm, threshold)
        self._keys: list[str] = []
        self._signatures: list[np.ndarray | None] = []
        self._by_hash: dict[str, int] = {}
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: str, text: str) -> str | None:
        """Add ``text`` under ``key`` and return None, or, when it duplicates an item already
        added, return that item's key (the earliest-added match) and add nothing."""
        digest = content_hash(text)
        if digest in self._by_hash:
            return self._keys[self._by_hash[digest]]
        signature = _signature(_shingles(text, self.shingle), self.num_perm, self.seed)
        band_keys: list[bytes] = []
        if signature is not None:
            band_keys = [
                signature[band * self.rows : (band + 1) * self.rows].tobytes() for band in range(self.bands)
            ]
            candidates: set[int] = set()
            for table, band_key in zip(self._buckets, band_keys, strict=True):
                candidates.update(table.get(band_key, ()))
            for index in sorted(candidates):
                if _similarity(self._signatures[index], signature) >= self.threshold:
                    return self._keys[index]
        index = len(self._keys)
        self._keys.append(key)
        self._signatures.append(signature)
        self._by_hash[digest] = index
        for table, band_key in zip(self._buckets, band_keys, strict=False):
            table.setdefault(band_key, []).append(index)
        return None
