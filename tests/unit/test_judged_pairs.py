"""The reward model as a judge: best-vs-worst pairs, duplicates and ties dropped, agreement counted."""

from __future__ import annotations

import math

import pytest

from components.data.preferences import judged_pairs


def _rec(prompt: str, answer: str) -> dict[str, str]:
    return {"prompt": prompt, "answer": answer, "task": "add"}


def _text(turns: list[dict[str, str]]) -> str:
    (turn,) = turns
    return turn["content"]


def test_best_scored_answer_is_chosen_and_worst_rejected():
    pairs, stats = judged_pairs([_rec("p", "22")], [["21", "22", "30"]], [[0.1, 0.9, -0.5]])
    (pair,) = pairs
    assert (_text(pair["chosen"]), _text(pair["rejected"])) == ("22", "30")
    assert pair["source"] == "judged" and pair["task"] == "add"
    # the verifier prefers 22 (exact) to 30 (no matching character): the judge agrees
    assert stats["n_verifiable"] == 1 and stats["agreement"] == 1.0


def test_repeated_answers_count_once_and_keep_their_first_score():
    # "21" twice: one candidate scored 0.2 (its first score), the repeat is counted, not re-scored
    pairs, stats = judged_pairs([_rec("p", "22")], [["21", "21", "23"]], [[0.2, 5.0, 0.4]])
    assert stats["n_duplicates"] == 1 and stats["n_samples"] == 3
    assert _text(pairs[0]["chosen"]) == "23" and _text(pairs[0]["rejected"]) == "21"


def test_a_tie_gives_no_pair():
    pairs, stats = judged_pairs(
        [_rec("p", "22"), _rec("q", "5")], [["21", "23"], ["5", "5"]], [[0.3, 0.3], [0.7, 0.7]]
    )
    assert pairs == [] and stats["n_ties"] == 1
    assert stats["n_prompts_one_answer"] == 1  # "q" has one distinct answer: nothing to pair either
    assert stats["n_pairs"] == 0 and math.isnan(stats["agreement"])


def test_a_repeated_pair_is_dropped():
    records = [_rec("p", "22"), _rec("p", "22")]
    pairs, stats = judged_pairs(records, [["22", "11"], ["11", "22"]], [[1.0, 0.0], [0.0, 1.0]])
    assert len(pairs) == 1 and stats["n_repeated_pairs"] == 1


def test_agreement_counts_judge_against_verifier_on_pairs_it_can_tell_apart():
    records = [_rec("a", "22"), _rec("b", "33"), _rec("c", "44")]
    samples = [["22", "99"], ["33", "99"], ["98", "99"]]
    # a: judge right; b: judge prefers the wrong answer; c: both wrong and equally far from 44
    scores = [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]
    pairs, stats = judged_pairs(records, samples, scores)
    assert len(pairs) == 3
    assert stats["n_verifiable"] == 2 and stats["agreement"] == pytest.approx(0.5)


def test_scores_must_line_up_with_samples():
    with pytest.raises(ValueError, match="one score per sample"):
        judged_pairs([_rec("p", "1")], [["1", "2"]], [[0.5]])
