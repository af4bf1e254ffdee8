"""Cleaning of parsed elements (whitespace, chrome, running headers) and duplicate detection."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from unstructured.documents.elements import ElementMetadata, Footer, Header, NarrativeText, Title

from components.rag.cleaning import (
    BOILERPLATE_PHRASES,
    CleaningStats,
    NearDuplicateIndex,
    clean_elements,
    content_hash,
    estimate_jaccard,
    is_boilerplate,
    jaccard,
    line_key,
    normalize_whitespace,
    repeated_lines,
)

ROOT = Path(__file__).resolve().parents[2]

# --- normalize_whitespace --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("10\u00a0km\u202fnorth", "10 km north"),  # NBSP, narrow NBSP
        ("zero\u200bwidth\ufeff", "zerowidth"),  # zero-width space, BOM
        ("hy\u00adphen\u00adated", "hyphenated"),  # soft hyphens inside a word
        ("infor\u00ad\nmation", "information"),  # soft hyphen at a line break
        ("infor-\nmation retrieval", "information retrieval"),
        ("infor-  \n   mation", "information"),  # spaces around the break
        ("Jean-\nPaul", "Jean-\nPaul"),  # uppercase after the break: a real hyphen
        ("COVID-\n19", "COVID-\n19"),  # digits: kept
        ("a  \t  b", "a b"),
        ("  first line  \n\tsecond line\t", "first line\nsecond line"),
        ("one\n\n\n\n\ntwo", "one\n\ntwo"),
        ("one\n \n\t\n \ntwo", "one\n\ntwo"),  # blank lines holding only spaces
        ("one\r\ntwo\rthree", "one\ntwo\nthree"),
        ("para one\n\npara two", "para one\n\npara two"),  # a single blank line stays
    ],
)
def test_normalize_whitespace(raw, expected):
    assert normalize_whitespace(raw) == expected


def test_dehyphenation_does_not_cross_a_blank_line():
    assert normalize_whitespace("infor-\n\nmation") == "infor-\n\nmation"


# --- is_boilerplate --------------------------------------------------------------------------

NAVIGATION = [
    "Next",
    "Previous",
    "Prev",
    "Up",
    "Home",
    "Top",
    "NEXT",
    "next »",
    "« Previous",
    "Back to top",
    "↑ Back to top",
    "Skip to content",
    "Skip to main content",
    "Table of Contents",
    "Contents",
    "Print this page",
    "Print this chapter",
    "Printer-friendly version",
    "Edit on GitHub",
    "Report a bug",
    "Index",
    "Search",
    "« Previous | Next »",
    "Home | Contents | Index",
    "[Contents][Index]",
    "Next: Types, Previous: Introduction, Up: Using libffi   [Contents][Index]",
    "Next: Types, Previous: Introduction, Up: Using libffi",
    "Previous: Closure Example, Up: Using libffi \u00a0 [Contents][Index]",
    "Next: Introduction, Up: (dir)   [Contents][Index]",
    "Page 3 of 12",
    "page 3",
    "3 of 12",
    "17",
    "- 17 -",
    "»",
    "|",
    "* * *",
]

CONTENT = [
    "Next, configure the server and restart it.",
    "The index is rebuilt every night from the raw documents.",
    "Contents of the box: one router, one power supply and a cable.",
    "Search results are ranked with reciprocal rank fusion.",
    "Next steps",
    "Index of packages",
    "Up and running in five minutes",
    "Top 10 features of the release",
    "Home insurance in the northern provinces",
    "Next: install the package with pip, then run the tests.",
    "Installing",
    "1801",  # a year heading is not a page number
    "The next chapter explains how the search index and the table of contents are built.",
    "Page layout",
]


@pytest.mark.parametrize("text", NAVIGATION)
def test_navigation_lines_are_boilerplate(text):
    assert is_boilerplate(text)


@pytest.mark.parametrize("phrase", BOILERPLATE_PHRASES)
def test_every_documented_phrase_is_boilerplate(phrase):
    assert is_boilerplate(phrase.title())


@pytest.mark.parametrize("text", CONTENT)
def test_content_is_not_boilerplate(text):
    assert not is_boilerplate(text)


def test_long_text_with_navigation_words_is_not_boilerplate():
    text = "Next | Previous | " * 40
    assert not is_boilerplate(text)
    assert not is_boilerplate("")
    assert not is_boilerplate(" \n\t ")


# --- repeated lines and clean_elements -------------------------------------------------------


def test_line_key_normalises_digits_case_and_spaces():
    assert line_key("Chapter 3 — Installing  17") == "chapter # — installing #"
    assert line_key("libtasn1 manual\u00a0\u00a0 page 10") == line_key("LIBTASN1 Manual page 9")


def test_repeated_lines_finds_running_header_with_changing_page_numbers():
    pages = [
        [f"Chapter 3 — Installing  {8 + p}", f"Body text unique to page {p}: {'abcde'[p]} words.", "Summary"]
        for p in range(5)
    ]
    pages[2].append("A line that appears on one page only")
    repeated = repeated_lines(pages)
    assert line_key("Chapter 3 — Installing 12") in repeated  # pages 8..12: one and two digits
    assert line_key("A line that appears on one page only") not in repeated
    assert line_key("Summary") in repeated  # on every page
    # digits differ but letters do too: no match
    assert not any(key.startswith("body text unique to page # : a") for key in repeated)


def test_repeated_lines_thresholds():
    pages = [["header"], ["header"], ["x"], ["y"], ["z"], ["w"]]
    assert repeated_lines(pages, min_pages=2, share=0.5) == set()  # 2 of 6 pages < 50 %
    assert repeated_lines(pages, min_pages=2, share=0.3) == {"header"}
    assert repeated_lines(pages[:2], min_pages=3, share=0.5) == set()  # only 2 pages
    assert repeated_lines([["dup", "dup"], ["a"], ["b"]], min_pages=1, share=0.5) == set()


def _meta(page):
    return ElementMetadata(page_number=page)


SECTIONS = ["Overview", "Setup", "Usage", "Tuning", "Appendix"]
TOPICS = ["storage", "networking", "scheduling", "caching", "logging"]


def _document(pages=5):
    elements = []
    for p in range(1, pages + 1):
        section, topic = SECTIONS[p - 1], TOPICS[p - 1]
        elements += [
            Header("ACME Corp annual report", metadata=_meta(p)),
            Title(f"libtasn1 manual   page {p}", metadata=_meta(p)),  # running header, tagged Title
            Title(section, metadata=_meta(p)),
            NarrativeText(f"The {topic} infor-\nmation model in\u00a0detail.", metadata=_meta(p)),
            NarrativeText("Next »", metadata=_meta(p)),
            NarrativeText(" \u00a0 \u200b", metadata=_meta(p)),
            Footer(f"Page {p} of {pages}", metadata=_meta(p)),
            NarrativeText(str(p), metadata=_meta(p)),
        ]
    return elements


def test_clean_elements_drops_chrome_and_keeps_content_in_order():
    kept, stats = clean_elements(_document())
    assert [e.text for e in kept] == [
        text
        for section, topic in zip(SECTIONS, TOPICS, strict=True)
        for text in (section, f"The {topic} information model in detail.")
    ]
    assert [e.category for e in kept] == ["Title", "NarrativeText"] * 5
    assert [e.metadata.page_number for e in kept] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    # boilerplate: "Next »", "Page p of 5" (a Footer, but boilerplate is checked first), "p"
    assert stats == CleaningStats(boilerplate=15, headers_footers=10, empty=5)
    assert stats.dropped == 30


def test_clean_elements_without_pages_keeps_repeated_content():
    elements = [Title("Summary"), NarrativeText("Same line"), NarrativeText("Same line"), Title("Summary")]
    elements += [NarrativeText("Same line") for _ in range(3)]
    kept, stats = clean_elements(elements)
    assert len(kept) == 7
    assert stats == CleaningStats()


def test_clean_elements_keeps_a_line_repeated_on_few_pages():
    elements = [
        NarrativeText(f"Unique paragraph number {chr(97 + p)}", metadata=_meta(p)) for p in range(1, 9)
    ]
    elements += [NarrativeText("Note", metadata=_meta(1)), NarrativeText("Note", metadata=_meta(2))]
    kept, stats = clean_elements(elements)
    assert len(kept) == 10 and stats.headers_footers == 0


def test_cleaning_stats_add_up():
    a = CleaningStats(boilerplate=1, headers_footers=2, empty=3)
    b = CleaningStats(boilerplate=10, headers_footers=20, empty=30)
    assert (a + b).to_dict() == {"boilerplate": 11, "headers_footers": 22, "empty": 33}
    assert sum([a, b]) == a + b
    assert a.to_dict() == {"boilerplate": 1, "headers_footers": 2, "empty": 3}


# --- content_hash ----------------------------------------------------------------------------


def test_content_hash_ignores_whitespace_but_not_words():
    base = content_hash("The quick brown fox\njumps over the lazy dog.")
    assert base == content_hash("  The quick\u00a0brown  fox jumps\tover the lazy dog.\n\n")
    assert base != content_hash("The quick brown cat jumps over the lazy dog.")
    assert len(base) == 64 and int(base, 16) >= 0


# --- MinHash ---------------------------------------------------------------------------------


def _words(seed, n, vocabulary=400):
    rng = random.Random(seed)
    vocab = sorted(
        {"".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 9))) for _ in range(vocabulary)}
    )
    return [rng.choice(vocab) for _ in range(n)]


def test_near_duplicate_with_one_word_changed_is_found_with_first_key():
    words = _words(1, 200)
    changed = list(words)
    changed[100] = "zzzzreplaced"
    index = NearDuplicateIndex()
    assert index.add("original", " ".join(words)) is None
    assert index.add("other", " ".join(_words(2, 200))) is None
    assert index.add("copy-1", " ".join(words) + " trailing") == "original"
    assert index.add("changed", " ".join(changed)) == "original"
    assert len(index) == 2  # duplicates are not added
    assert jaccard(" ".join(words), " ".join(changed)) > 0.9


def test_unrelated_text_of_similar_length_is_not_a_duplicate():
    index = NearDuplicateIndex()
    assert index.add("a", " ".join(_words(3, 200))) is None
    assert index.add("b", " ".join(_words(4, 210))) is None
    # same vocabulary, different order: shares words but hardly any 5-word shingles
    shuffled = _words(3, 200)
    random.Random(0).shuffle(shuffled)
    assert index.add("c", " ".join(shuffled)) is None
    assert len(index) == 3


def test_exact_duplicate_detected_before_minhash():
    index = NearDuplicateIndex(threshold=1.0)
    text = "Short chunk."
    assert index.add("first", text) is None
    assert index.add("again", "  Short\u00a0chunk.\n") == "first"
    assert index.add("punct", "short chunk") == "first"  # same shingles, estimated similarity 1.0
    assert index.add("other", "Short chunks.") is None
    # texts without words have no shingles: only exact copies match
    assert index.add("rule", "* * *") is None
    assert index.add("rule-2", "*  *  *") == "rule"
    assert index.add("dash", "---") is None


def test_first_matching_key_is_returned():
    words = _words(5, 150)
    index = NearDuplicateIndex(threshold=0.5)
    variant = list(words)
    variant[10:20] = ["alphaomega"] * 10
    assert index.add("k1", " ".join(variant)) is None
    assert index.add("k2", " ".join(_words(6, 150))) is None
    assert index.add("k3", " ".join(words)) == "k1"


def _with_changes(words, every):
    return [f"changed{i}" if i % every == 0 else w for i, w in enumerate(words)]


# (words changed at every n-th position, words replaced at the end): exact Jaccard from ~0.1 to ~0.9
VARIANTS = [(40, 0), (15, 0), (12, 0), (0, 10), (0, 30), (0, 60), (0, 90), (0, 120)]


@pytest.mark.parametrize(("every", "tail"), VARIANTS)
def test_estimate_jaccard_is_close_to_exact(every, tail):
    base = _words(7, 150)
    other = _with_changes(base, every) if every else base[: len(base) - tail] + _words(8, tail)
    a, b = " ".join(base), " ".join(other)
    exact = jaccard(a, b)
    assert 0.05 < exact < 0.95
    assert abs(estimate_jaccard(a, b) - exact) <= 0.15
    assert abs(estimate_jaccard(a, b, num_perm=256, seed=3) - exact) <= 0.1


def test_jaccard_edge_cases():
    assert jaccard("same text here", "Same text, here!") == 1.0
    assert estimate_jaccard("same text here", "Same text, here!") == 1.0
    assert jaccard("one two three four five six", "seven eight nine ten eleven twelve") == 0.0
    assert estimate_jaccard("", "") == 1.0 and estimate_jaccard("", "word") == 0.0


def test_index_is_deterministic_across_instances_and_processes():
    texts = [" ".join(_words(s, 120)) for s in range(6)]
    base = texts[0].split()
    texts += [" ".join(base[:60] + ["swapped"] + base[61:]), texts[3] + " end"]
    results = []
    for _ in range(2):
        index = NearDuplicateIndex(threshold=0.8, num_perm=32, seed=11)
        results.append([index.add(f"t{i}", t) for i, t in enumerate(texts)])
    assert results[0] == results[1] == [None] * 6 + ["t0", "t3"]
    assert index.bands * index.rows == 32 and index.bands > 1

    # the hashing must not depend on Python's per-process string hash seed
    code = (
        "from components.rag.cleaning import estimate_jaccard as e;"
        "print(repr(e('alpha beta gamma delta epsilon zeta eta theta', "
        "'alpha beta gamma delta epsilon zeta eta iota', num_perm=64, shingle=2)))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for hash_seed in ("1", "2")
    }
    assert len(outputs) == 1
    assert float(outputs.pop()) == estimate_jaccard(
        "alpha beta gamma delta epsilon zeta eta theta",
        "alpha beta gamma delta epsilon zeta eta iota",
        num_perm=64,
        shingle=2,
    )
