"""Multi-query expansion: the generator's reply parsed into queries, and the lists fused by RRF."""

from __future__ import annotations

import pytest

from components.rag.index import fuse_rankings
from components.rag.service import (
    HYPOTHETICAL_PROMPT,
    REWRITE_PROMPT,
    hypothetical_passage,
    make_rewriter,
    parse_rewrites,
)
from components.rag.store import Hit


def _hit(name: str, score: float = 0.0) -> Hit:
    return Hit(chunk_id=name, source=f"{name}.md", text=f"text of {name}", page=0, score=score)


def test_rewrites_lose_list_markers_quotes_repeats_and_the_question_itself():
    reply = (
        "1. How do I pass a struct by value?\n"
        '2) "calling convention for structures"\n'
        "- How do I pass a struct by value?\n"  # a repeat
        "\n"
        "* Passing a Struct By Value\n"  # the question, in other case
        "Query 4: ffi_prep_cif struct argument\n"
        "ok\n" + "x" * 301  # too short to be a query  # rambling, not a query
    )
    got = parse_rewrites(reply, "passing a struct by value", n=5)
    assert got == [
        "How do I pass a struct by value?",
        "calling convention for structures",
        "ffi_prep_cif struct argument",
    ]


def test_rewrites_stop_at_n():
    assert parse_rewrites("a b c\nd e f\ng h i\n", "q", n=2) == ["a b c", "d e f"]


def test_the_rewriter_asks_for_n_wordings_then_one_hypothetical_answer():
    asked: list[str] = []
    replies = iter(["first wording\nsecond wording\nthird wording\nfourth wording", "It is  a\nthing."])

    def generate(messages: list[dict[str, str]]) -> str:
        (message,) = messages
        assert message["role"] == "user"
        asked.append(message["content"])
        return next(replies)

    rewrite = make_rewriter(generate, 3)
    assert rewrite("what is it?") == ["first wording", "second wording", "third wording", "It is a thing."]
    assert asked == [
        REWRITE_PROMPT.format(n=3, question="what is it?"),
        HYPOTHETICAL_PROMPT.format(question="what is it?"),
    ]
    assert "what is it?" in asked[0] and "3 different" in asked[0]


def test_a_hypothetical_answer_that_repeats_the_question_is_dropped():
    assert hypothetical_passage("What is it?", "what is it") == ""
    assert hypothetical_passage("x" * 700, "q") == "x" * 600
    replies = iter(["what is it?", "What is it?"])  # a generator that only echoes
    assert make_rewriter(lambda _: next(replies), 2)("what is it?") == []


def test_rrf_fusion_by_hand():
    a, b, c, d = (_hit(x) for x in "abcd")
    fused = fuse_rankings([[a, b, c], [b, d], [b, a]], rrf_k=10)
    # a: 1/11 + 1/12; b: 1/12 + 1/11 + 1/11; c: 1/13; d: 1/12
    expected = {"b": 1 / 12 + 2 / 11, "a": 1 / 11 + 1 / 12, "d": 1 / 12, "c": 1 / 13}
    assert [h.chunk_id for h in fused] == ["b", "a", "d", "c"]
    for hit in fused:
        assert hit.score == pytest.approx(expected[hit.chunk_id])


def test_fusion_keeps_the_first_lists_copy_and_first_appearance_on_ties():
    first, other = _hit("a", 0.9), _hit("a", 0.1)
    first = Hit(**{**first.__dict__, "text": "the question's own copy"})
    x, y = _hit("x"), _hit("y")
    fused = fuse_rankings([[first, x], [y, other]], rrf_k=10)
    assert fused[0].chunk_id == "a" and fused[0].text == "the question's own copy"
    assert [h.chunk_id for h in fused[1:]] == ["y", "x"]  # y: 1/11 (first in list 2), x: 1/12
    tie = fuse_rankings([[x], [y]], rrf_k=10)  # both 1/11: the one seen first stays first
    assert [h.chunk_id for h in tie] == ["x", "y"]
    # same chunk id in another file is another chunk
    assert len(fuse_rankings([[_hit("a")], [Hit("a", "other.md", "t", 0, 0.0)]], rrf_k=10)) == 2


def test_the_cli_offers_exactly_the_expansions_retrieval_knows():
    from components.rag.index import EXPANSIONS
    from flows import rag_cli

    assert rag_cli.EXPANSIONS == EXPANSIONS


def test_the_rag_eval_stage_refuses_the_registry_as_its_rewriter():
    """The stage's inputs must be files DVC can track: multi_query there needs a bundled or local model."""
    from pathlib import Path

    from components.config import ConfigError
    from components.params import parse_params
    from components.tracking import RecordingTracker
    from tasks import rag_eval

    root = Path(__file__).resolve().parents[2]
    params = parse_params(
        {
            "rag_eval": {"questions": str(root / "data/rag_eval/questions.jsonl")},
            "rag_index": {"expansion": "multi_query", "generator": "champion", "reranker": "none"},
        }
    )
    with pytest.raises(ConfigError, match="^rag_index.generator: the rag_eval stage rewrites questions"):
        rag_eval.run(params, RecordingTracker())
