"""File-level retrieval metrics and the question-set format of ``posttrain rag eval`` (pure functions)."""

from __future__ import annotations

import math

import pytest

from components.errors import DataError, MissingInputError
from components.rag.evaluation import (
    CUTOFF,
    Question,
    contains_answer,
    mean_scores,
    ranked_files,
    read_questions,
    same_source,
    score_ranking,
)

KEYS = ["recall_at_1", "recall_at_5", "recall_at_10", "mrr_at_10", "ndcg_at_10"]


def _files(*names: str) -> list[str]:
    return [f"docs/{n}" for n in names]


def test_one_relevant_file_at_rank_3():
    scores = score_ranking(_files("a", "b", "c", "d"), ["docs/c"])
    assert list(scores) == KEYS
    assert scores == pytest.approx(
        {
            "recall_at_1": 0.0,
            "recall_at_5": 1.0,
            "recall_at_10": 1.0,
            "mrr_at_10": 1 / 3,
            "ndcg_at_10": 1 / math.log2(4),  # = 0.5: one gain at rank 3 over an ideal rank 1
        }
    )


def test_two_relevant_files_at_ranks_1_and_4():
    scores = score_ranking(_files("x", "b", "c", "y", "e", "f"), ["docs/x", "docs/y"])
    dcg = 1 / math.log2(2) + 1 / math.log2(5)
    ideal = 1 / math.log2(2) + 1 / math.log2(3)
    assert scores == pytest.approx(
        {
            "recall_at_1": 0.5,
            "recall_at_5": 1.0,
            "recall_at_10": 1.0,
            "mrr_at_10": 1.0,
            "ndcg_at_10": dcg / ideal,
        }
    )
    assert scores["ndcg_at_10"] == pytest.approx(0.8772, abs=1e-4)


def test_two_relevant_files_one_beyond_rank_5():
    files = _files("a", "b", "c", "d", "e", "f", "y", "h") + ["notes/x"]
    scores = score_ranking(files, ["notes/x", "docs/y"])  # ranks 9 and 7
    dcg = 1 / math.log2(8) + 1 / math.log2(10)
    ideal = 1 / math.log2(2) + 1 / math.log2(3)
    assert scores == pytest.approx(
        {
            "recall_at_1": 0.0,
            "recall_at_5": 0.0,
            "recall_at_10": 1.0,
            "mrr_at_10": 1 / 7,
            "ndcg_at_10": dcg / ideal,
        }
    )


def test_perfect_and_missing_rankings():
    assert score_ranking(_files("x", "y", "z"), ["docs/y", "docs/x"]) == pytest.approx(
        {"recall_at_1": 0.5, "recall_at_5": 1.0, "recall_at_10": 1.0, "mrr_at_10": 1.0, "ndcg_at_10": 1.0}
    )
    assert score_ranking(_files("a", "b"), ["docs/z"]) == dict.fromkeys(KEYS, 0.0)
    assert score_ranking([], ["docs/z"]) == dict.fromkeys(KEYS, 0.0)


def test_a_relevant_file_after_the_cutoff_does_not_count():
    files = [f"docs/{i}" for i in range(CUTOFF)] + ["docs/late"]
    assert CUTOFF == 10
    assert score_ranking(files, ["docs/late"]) == dict.fromkeys(KEYS, 0.0)
    assert score_ranking(files[1:], ["docs/late"])["recall_at_10"] == 1.0  # now at rank 10


def test_metrics_stay_within_0_and_1_when_two_files_match_one_relevant_path():
    scores = score_ranking(["docs/v1/guide.md", "docs/v2/guide.md"], ["guide.md"])
    assert all(0.0 <= v <= 1.0 for v in scores.values()), scores


def test_ranked_files_keep_the_first_hit_of_each_file():
    assert ranked_files(["a", "b", "a", "c", "b", "d"]) == ["a", "b", "c", "d"]
    assert ranked_files([]) == []
    assert ranked_files(iter(["x", "x"])) == ["x"]


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("docs/a.pdf", "docs/a.pdf", True),
        ("docs/a.pdf", "data/docs/a.pdf", True),  # a question file names a suffix of the indexed path
        ("data/docs/a.pdf", "docs/a.pdf", True),  # either way round
        ("a.pdf", "data/docs/a.pdf", True),
        ("./docs/a.pdf", "docs//a.pdf", True),  # normalised first
        ("/abs/data/docs/a.pdf", "docs/a.pdf", True),
        ("docs/a.pdf", "data/mydocs/a.pdf", False),  # only at a path boundary
        ("a.pdf", "data/docs/ba.pdf", False),
        ("docs/a.pdf", "docs/a.pdf.bak", False),
        ("docs/b/a.pdf", "docs/a.pdf", False),
        ("docs/a.pdf", "docs/A.pdf", False),
    ],
)
def test_same_source_matches_whole_path_suffixes(a, b, same):
    assert same_source(a, b) is same


def test_mean_scores_average_and_round():
    rows = [
        {"recall_at_1": 1.0, "mrr_at_10": 1.0},
        {"recall_at_1": 0.0, "mrr_at_10": 1 / 3},
        {"recall_at_1": 0.0, "mrr_at_10": 0.5},
    ]
    assert mean_scores(rows) == {"recall_at_1": 0.3333, "mrr_at_10": 0.6111}
    assert mean_scores([]) == {}


def test_contains_answer_ignores_case_and_spacing():
    assert contains_answer("It uses the  Gilder,\nlike its neighbours.", "the gilder")
    assert contains_answer("41,000 tonnes of copper", "41,000 TONNES")
    assert not contains_answer("41000 tonnes", "41,000 tonnes")
    assert not contains_answer("gild", "gilder")


# -- read_questions ----------------------------------------------------------------------------


def test_read_questions_parses_ids_relevant_and_answers(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(
        '{"id": "q1", "question": "Where?", "relevant": ["docs/a.md"], "answer": "here"}\n'
        "\n   \n"
        '{"id": 2, "question": "Which?", "relevant": ["docs/a.md", "b.pdf"], "extra": true}\n'
    )
    assert read_questions(str(path)) == [
        Question("q1", "Where?", ("docs/a.md",), "here"),
        Question(2, "Which?", ("docs/a.md", "b.pdf"), None),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": 2, "question": ', "not valid JSON"),
        ('["q", "relevant"]', "expected a JSON object, got list"),
        ('{"question": "Why?", "relevant": ["a.md"]}', 'missing "id"'),
        ('{"id": 2, "question": "  ", "relevant": ["a.md"]}', '"question" must be a non-empty string'),
        ('{"id": 2, "question": 7, "relevant": ["a.md"]}', '"question" must be a non-empty string'),
        ('{"id": 2, "question": "Why?"}', '"relevant" must be a non-empty list of source paths'),
        (
            '{"id": 2, "question": "Why?", "relevant": []}',
            '"relevant" must be a non-empty list of source paths',
        ),
        (
            '{"id": 2, "question": "Why?", "relevant": "a.md"}',
            '"relevant" must be a non-empty list of source paths',
        ),
        ('{"id": 2, "question": "Why?", "relevant": ["a.md", 3]}', '"relevant" must be a non-empty list'),
        ('{"id": 2, "question": "Why?", "relevant": ["a.md"], "answer": 42}', '"answer" must be a string'),
    ],
)
def test_read_questions_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "q.jsonl"
    path.write_text('{"id": 1, "question": "Fine?", "relevant": ["a.md"]}\n' + line + "\n")
    with pytest.raises(DataError) as exc:
        read_questions(str(path))
    assert str(exc.value).startswith(f"{path}:2: ") and message in str(exc.value)


def test_read_questions_missing_or_empty_file(tmp_path):
    with pytest.raises(MissingInputError, match=r"nope\.jsonl: no such question file"):
        read_questions(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no questions$"):
        read_questions(str(tmp_path / "empty.jsonl"))


def test_read_questions_names_the_line_of_a_bad_byte(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes(
        b'{"id": 1, "question": "Fine?", "relevant": ["a.md"]}\n{"id": 2, "question": "caf\xe9?"}\n'
    )
    with pytest.raises(DataError, match=r":2: not valid UTF-8"):
        read_questions(str(path))
