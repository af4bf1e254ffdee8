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
    gate_only = dataclasses.replace(cfg, promotion_max_accuracy_drop=0.5, promotion_metric="reward_mean")
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
