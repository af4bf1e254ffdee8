"""The champion/challenger decision on hand-computed cases, and the suite fingerprint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from components.evaluation.gate import promotion_decision, suite_fingerprint
from components.params import EvaluateConfig


def m(acc: float, sampled: float = 0.0, reward: float = 0.0) -> dict[str, float]:
    return {"accuracy": acc, "sampled_accuracy": sampled, "reward_mean": reward}


def test_first_candidate_needs_only_to_match_sft():
    assert promotion_decision("accuracy", m(0.40), m(0.40), None, 0.02)[0]
    ok, reason = promotion_decision("accuracy", m(0.39), m(0.40), None, 0.02)
    assert not ok and "below sft 0.400" in reason


def test_never_below_sft_even_when_the_champion_is_worse():
    # 0.355 vs sft 0.375: the regression the old gate promoted; a weak champion does not excuse it
    ok, reason = promotion_decision("accuracy", m(0.355), m(0.375), m(0.30), 0.02)
    assert not ok and "0.355" in reason and "0.375" in reason


def test_within_max_drop_of_the_champion_promotes_and_beyond_it_does_not():
    assert promotion_decision("accuracy", m(0.48), m(0.40), m(0.50), 0.02)[0]  # 0.02 below: allowed
    ok, reason = promotion_decision("accuracy", m(0.47), m(0.40), m(0.50), 0.02)
    assert not ok and "champion's 0.500" in reason


def test_alignment_is_judged_uncompressed_and_compression_against_the_aligned_model():
    # the SmolLM2 profile's numbers: DPO kept SFT's 0.617, int8 flipped three answers (0.592)
    ok, reason = promotion_decision("accuracy", m(0.592), m(0.617), None, 0.02, m(0.617), 0.03)
    assert ok and "aligned accuracy 0.617 >= sft 0.617" in reason and "within 0.03" in reason
    ok, reason = promotion_decision("accuracy", m(0.583), m(0.617), None, 0.02, m(0.617), 0.03)
    assert not ok and "more than 0.03 below the aligned model's 0.617" in reason
    # exactly at the tolerance passes, though 0.617 - 0.03 is not 0.587 in floating point
    assert promotion_decision("accuracy", m(0.59), m(0.62), None, 0.02, m(0.62), 0.03)[0]


def test_an_aligned_model_below_sft_is_refused_whatever_compression_did():
    # compression cannot launder a regression: a candidate above SFT made from a worse aligned model
    ok, reason = promotion_decision("accuracy", m(0.38), m(0.375), None, 0.02, m(0.37), 0.03)
    assert not ok and "aligned accuracy 0.370 is below sft 0.375" in reason
    # and with no tolerance the candidate must keep every point of the aligned model's
    assert not promotion_decision("accuracy", m(0.395), m(0.375), None, 0.02, m(0.40), 0.0)[0]
    assert promotion_decision("accuracy", m(0.40), m(0.375), None, 0.02, m(0.40), 0.0)[0]


def test_the_champion_still_bounds_a_compressed_candidate():
    ok, reason = promotion_decision("accuracy", m(0.45), m(0.40), m(0.50), 0.02, m(0.46), 0.03)
    assert not ok and "champion's 0.500" in reason
    ok, reason = promotion_decision("accuracy", m(0.49), m(0.40), m(0.50), 0.02, m(0.50), 0.03)
    assert ok and "champion's 0.500" in reason


def test_the_chosen_metric_decides():
    candidate, sft, champion = m(0.30, reward=0.60), m(0.40, reward=0.50), m(0.45, reward=0.55)
    assert not promotion_decision("accuracy", candidate, sft, champion, 0.02)[0]
    assert promotion_decision("reward_mean", candidate, sft, champion, 0.02)[0]
    with pytest.raises(ValueError, match="perplexity"):
        promotion_decision("perplexity", candidate, sft, champion, 0.02)


def test_suite_fingerprint_ignores_gate_settings_but_not_scoring_settings():
    records = [{"prompt": "add 1 and 2", "answer": "3", "task": "add"}]
    cfg = EvaluateConfig()
    base = suite_fingerprint(records, cfg)
    gate_only = dataclasses.replace(
        cfg,
        promotion_max_accuracy_drop=0.5,
        promotion_max_compression_drop=0.1,
        promotion_metric="reward_mean",
    )
    assert suite_fingerprint(records, gate_only) == base
    assert suite_fingerprint(records, dataclasses.replace(cfg, n_samples=3)) != base
    assert suite_fingerprint([{**records[0], "answer": "4"}], cfg) != base


def test_a_noop_run_skips_the_gate_only_when_it_decided_on_this_candidate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from components.params import Params
    from tasks.promote import LAST_PROMOTION, _promotion_key, promotion_is_current

    monkeypatch.chdir(tmp_path)
    params = Params()
    manifest = Path(params.paths.evaluation) / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"inputs": {"compressed": "abc"}}))
    assert not promotion_is_current(params)  # never promoted here
    LAST_PROMOTION.parent.mkdir(parents=True)
    LAST_PROMOTION.write_text(json.dumps(_promotion_key(params, "abc")))
    assert promotion_is_current(params)
    manifest.write_text(json.dumps({"inputs": {"compressed": "def"}}))  # a new candidate
    assert not promotion_is_current(params)
    manifest.write_text(json.dumps({"inputs": {"compressed": "abc"}}))
    stricter = dataclasses.replace(
        params, evaluate=dataclasses.replace(params.evaluate, promotion_metric="reward_mean")
    )
    assert not promotion_is_current(stricter)  # the gate itself changed
