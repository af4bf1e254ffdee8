"""The stage DAG read from ``dvc.yaml``: edges from outs -> deps, order, descendants, cycles."""

from __future__ import annotations

import re

import pytest
import yaml

from components.errors import MissingInputError
from flows.dag import descendants, load_stages, topological_order, upstream


def _stages() -> dict[str, dict]:
    """A small diamond plus an independent stage, listed out of dependency order on purpose.

    prep -> train -> evaluate <- score <- prep ; docs (no deps on others)
    """
    return {
        "evaluate": {
            "deps": ["models/trained", "data/scores/all.json", "src/eval.py"],
            "outs": [{"metrics/answers.json": {"cache": False}}],
            "metrics": [{"metrics/evaluate.json": {"cache": False}}],
        },
        "docs": {"deps": ["docs_src"], "outs": ["data/index"]},
        "train": {"deps": ["data/prep/train.jsonl", "src/train.py"], "outs": ["models/trained"]},
        "score": {"deps": ["data/prep"], "outs": ["data/scores"]},
        "prep": {"deps": ["raw", "src/prep.py"], "outs": ["data/prep"]},
    }


def test_upstream_edges_come_from_outs_and_deps():
    assert upstream(_stages()) == {
        "evaluate": {"train", "score"},
        "docs": set(),
        "train": {"prep"},  # a file inside another stage's output directory
        "score": {"prep"},
        "prep": set(),
    }


def test_upstream_handles_deps_that_contain_an_output():
    stages = {
        "make": {"outs": ["data/processed/train"]},
        "use": {"deps": ["data/processed"]},  # depends on a directory holding another stage's output
    }
    assert upstream(stages)["use"] == {"make"}


def test_upstream_does_not_match_path_prefixes_that_are_not_directories():
    stages = {
        "a": {"outs": ["data/proc"]},
        "b": {"deps": ["data/processed", "data/proc.txt", "data/pro"]},
        "c": {"deps": ["data/proc/"]},  # trailing slash still means the same directory
    }
    graph = upstream(stages)
    assert graph["b"] == set()
    assert graph["c"] == {"a"}


def test_stage_does_not_depend_on_itself():
    stages = {"loop": {"deps": ["models/x"], "outs": ["models/x"]}}
    assert upstream(stages) == {"loop": set()}
    assert topological_order(stages) == ["loop"]


def test_missing_or_empty_deps_and_outs():
    stages = {"a": {}, "b": {"deps": None, "outs": None}, "c": {"deps": [], "outs": []}}
    assert upstream(stages) == {"a": set(), "b": set(), "c": set()}


def _assert_topological(order: list[str], stages: dict[str, dict]) -> None:
    assert sorted(order) == sorted(stages)
    graph = upstream(stages)
    for name, ups in graph.items():
        for up in ups:
            assert order.index(up) < order.index(name), f"{up} must run before {name}"


def test_topological_order_respects_every_edge():
    stages = _stages()
    order = topological_order(stages)
    _assert_topological(order, stages)


def test_topological_order_breaks_ties_by_listing_order():
    stages = _stages()
    order = topological_order(stages)
    # docs is ready at once and listed before prep, so it comes first; train is listed before score
    assert order == ["docs", "prep", "train", "score", "evaluate"]
    reordered = {name: stages[name] for name in ["prep", "score", "train", "evaluate", "docs"]}
    order2 = topological_order(reordered)
    _assert_topological(order2, reordered)
    assert order2 == ["prep", "score", "train", "evaluate", "docs"]


def test_topological_order_of_nothing():
    assert topological_order({}) == []


def test_cycle_raises_naming_the_stages():
    stages = {
        "free": {"outs": ["f"]},
        "a": {"deps": ["y"], "outs": ["x"]},
        "b": {"deps": ["x"], "outs": ["y"]},
    }
    with pytest.raises(ValueError, match=r"cycle among \['a', 'b'\]"):
        topological_order(stages)


def test_descendants():
    stages = _stages()
    assert descendants(stages, {"prep"}) == {"train", "score", "evaluate"}
    assert descendants(stages, {"train"}) == {"evaluate"}
    assert descendants(stages, {"score", "train"}) == {"evaluate"}
    assert descendants(stages, {"evaluate"}) == set()
    assert descendants(stages, {"docs"}) == set()
    assert descendants(stages, set()) == set()
    # roots are never reported as their own descendants, even when one is downstream of another
    assert descendants(stages, {"prep", "train"}) == {"score", "evaluate"}


def test_load_stages_reads_dvc_yaml(tmp_path):
    stages = _stages()
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    loaded = load_stages(tmp_path)
    assert loaded == stages
    assert list(loaded) == list(stages)  # order preserved: it breaks ties in the flow order


def test_load_stages_missing_file_names_path(tmp_path):
    with pytest.raises(MissingInputError, match=re.escape(str(tmp_path / "dvc.yaml"))):
        load_stages(tmp_path)
