"""Preference collection: graded samples -> (chosen right, rejected wrong) pairs, and the split."""

from __future__ import annotations

import pytest

from components.data.preferences import build_pairs, split_pairs


def _rec(prompt: str, answer: str, task: str = "add") -> dict[str, str]:
    return {"prompt": prompt, "answer": answer, "task": task}


def _text(turns: list[dict[str, str]]) -> str:
    (turn,) = turns
    return turn["content"]


def test_mixed_samples_give_a_sampled_pair():
    rec = _rec("add 10 and 12", "22")
    samples = ["21", "22", "23", "21", " 22 ", "21", "23"]
    pairs, stats = build_pairs([rec], [samples], reference_as_chosen=True)
    (pair,) = pairs
    assert pair["source"] == "sampled"
    assert pair["task"] == "add"
    assert pair["prompt"] == [{"role": "user", "content": "add 10 and 12"}]
    assert pair["chosen"][0]["role"] == "assistant" and pair["rejected"][0]["role"] == "assistant"
    assert _text(pair["chosen"]).strip() == "22"  # a correct sample
    assert _text(pair["rejected"]) == "21"  # the most frequent wrong answer (3x vs 2x "23")
    assert stats["n_pairs"] == stats["n_pairs_sampled"] == 1
    assert stats["n_pairs_reference"] == 0
    assert stats["n_prompts_all_correct"] == stats["n_prompts_all_wrong"] == 0


def test_chosen_is_a_sample_not_the_reference():
    rec = _rec("reverse abc", "cba", "reverse")
    pairs, _ = build_pairs([rec], [["cba ", "cba ", "bca"]], reference_as_chosen=True)
    assert _text(pairs[0]["chosen"]) == "cba "  # on-policy text, graded correct


def test_rejected_tie_is_broken_by_the_clearer_error():
    rec = _rec("reverse obka", "akbo", "reverse")
    # "akbz" and "zzzz" are both wrong once; "zzzz" earns less partial credit, so it is rejected
    for order in (["akbo", "akbz", "zzzz"], ["akbo", "zzzz", "akbz"]):
        pairs, _ = build_pairs([rec], [order], reference_as_chosen=False)
        assert _text(pairs[0]["rejected"]) == "zzzz"


def test_all_wrong_uses_reference_when_allowed():
    rec = _rec("uppercase abc", "ABC", "upper")
    samples = ["abc", "ABD", "abc"]
    pairs, stats = build_pairs([rec], [samples], reference_as_chosen=True)
    (pair,) = pairs
    assert pair["source"] == "reference"
    assert _text(pair["chosen"]) == "ABC"
    assert _text(pair["rejected"]) == "abc"
    assert stats["n_pairs"] == 1
    assert stats["n_pairs_reference"] == 1
    assert stats["n_pairs_sampled"] == 0
    assert stats["n_prompts_all_wrong"] == 1


def test_all_wrong_gives_no_pair_without_reference():
    pairs, stats = build_pairs([_rec("add 10 and 10", "20")], [["21", "19"]], reference_as_chosen=False)
    assert pairs == []
    assert stats["n_pairs"] == stats["n_pairs_reference"] == 0
    assert stats["n_prompts_all_wrong"] == 1


def test_all_right_gives_no_pair():
    pairs, stats = build_pairs(
        [_rec("add 10 and 10", "20")], [["20", " 20", "20\n"]], reference_as_chosen=True
    )
    assert pairs == []
    assert stats["n_prompts_all_correct"] == 1
    assert stats["n_pairs"] == 0
    assert stats["sample_accuracy"] == 1.0


def test_stats_over_several_prompts():
    records = [
        _rec("add 10 and 11", "21"),  # mixed -> sampled pair
        _rec("add 10 and 12", "22"),  # all right -> nothing
        _rec("add 10 and 13", "23"),  # all wrong -> reference pair
        _rec("reverse ab", "ba", "reverse"),  # mixed -> sampled pair
    ]
    samples = [["21", "20", "21"], ["22", "22"], ["24", "25", "24", "x"], ["ab", "ba", "ab", "ab"]]
    pairs, stats = build_pairs(records, samples, reference_as_chosen=True)
    n_correct = sum(s.strip() == r["answer"] for r, outs in zip(records, samples, strict=True) for s in outs)
    n_total = sum(len(outs) for outs in samples)
    assert stats["sample_accuracy"] == pytest.approx(n_correct / n_total)
    assert stats["n_prompts"] == 4
    assert stats["n_pairs"] == len(pairs) == 3
    assert stats["n_pairs_sampled"] + stats["n_pairs_reference"] == stats["n_pairs"]
    assert stats["n_pairs_reference"] == 1
    assert [p["source"] for p in pairs] == ["sampled", "reference", "sampled"]
    assert [p["task"] for p in pairs] == ["add", "add", "reverse"]
    for pair in pairs:
        rec = next(r for r in records if r["prompt"] == _text(pair["prompt"]))
        assert _text(pair["chosen"]).strip() == rec["answer"]
        assert _text(pair["rejected"]).strip() != rec["answer"]


def test_no_samples_gives_zero_accuracy_not_a_crash():
    pairs, stats = build_pairs([], [], reference_as_chosen=True)
    assert pairs == [] and stats["sample_accuracy"] == 0.0 and stats["n_prompts"] == 0


def test_records_and_samples_must_align():
    with pytest.raises(ValueError):
        build_pairs([_rec("a", "b"), _rec("c", "d")], [["b"]], reference_as_chosen=True)


# --------------------------------------------------------------------------- split_pairs


def _pairs(n: int) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"p{i}"}], "id": i} for i in range(n)]


def test_split_is_deterministic_and_disjoint():
    pairs = _pairs(40)
    train, held = split_pairs(pairs, 0.25, seed=3)
    assert split_pairs(pairs, 0.25, seed=3) == (train, held)
    ids_train, ids_eval = [p["id"] for p in train], [p["id"] for p in held]
    assert set(ids_train).isdisjoint(ids_eval)
    assert sorted(ids_train + ids_eval) == list(range(40))  # nothing lost or duplicated
    assert len(held) == 10


def test_split_depends_on_seed_and_shuffles():
    pairs = _pairs(40)
    a = split_pairs(pairs, 0.25, seed=0)
    b = split_pairs(pairs, 0.25, seed=1)
    assert a != b
    assert [p["id"] for p in a[0] + a[1]] != list(range(40))  # not the input order


def test_split_does_not_modify_input():
    pairs = _pairs(10)
    before = [p["id"] for p in pairs]
    split_pairs(pairs, 0.5, seed=0)
    assert [p["id"] for p in pairs] == before


def test_split_keeps_at_least_one_eval_pair():
    train, held = split_pairs(_pairs(2), 0.01, seed=0)
    assert len(held) == 1 and len(train) == 1
    train, held = split_pairs(_pairs(1), 0.5, seed=0)
    assert len(train) + len(held) == 1
    assert split_pairs([], 0.2, seed=0) == ([], [])
