"""``posttrain metrics``: narrow tables, the evaluation as model x metric, the DAG's order."""

from __future__ import annotations

import json
from pathlib import Path

from flows.metrics_view import render


def _model(acc: float) -> dict:
    return {
        "accuracy": acc,
        "lenient_accuracy": acc + 0.1,
        "sampled_accuracy": acc / 2,
        "reward_mean": 0.5,
        "perplexity": 2.0,
        "accuracy_by_task": {"add": acc, "capital": 1.0},
    }


def test_metrics_are_narrow_tables_in_dag_order(tmp_path: Path) -> None:
    evaluate = {
        m: _model(a) for m, a in [("base", 0.0), ("sft", 0.25), ("aligned", 0.3), ("compressed", 0.3)]
    }
    evaluate |= {"candidate": "compressed", "candidate_vs_sft": {"passed": True, "reason": "ok"}}
    (tmp_path / "evaluate.json").write_text(json.dumps(evaluate))
    (tmp_path / "sft.json").write_text(json.dumps({"final_loss": 0.61234, "n_train": 6000}))
    out = render(tmp_path, order=["sft", "evaluate"])
    assert out.index("== sft") < out.index("== evaluate")  # DAG order, not alphabetical
    assert max(len(line) for line in out.splitlines()) <= 120
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    assert rows["sft"][1:6] == ["0.250", "0.350", "0.125", "0.500", "2.000"]
    assert rows["sft"][-3:] == ["0.25", "/", "1.00"]  # add / capital
    assert "compressed (candidate)" in out
    assert rows["candidate_vs_sft.passed"][1] == "True" and rows["final_loss"][1] == "0.612"
    assert rows["n_train"][1] == "6,000"
    assert render(tmp_path, stages=["sft"]).count("==") == 1
    assert "run the pipeline first" in render(tmp_path / "none")
