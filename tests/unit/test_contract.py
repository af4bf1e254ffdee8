"""The contract between ``params.yaml``, the typed configs, ``dvc.yaml`` and the flow.

These read the real files at the project root: a drift between them (a new config field that
``dvc.yaml`` does not depend on, a stage writing somewhere ``paths`` does not say, a flow order
that runs a stage before its inputs exist) fails here, in milliseconds.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from components.config import flatten, read_params, to_dict
from components.params import SECTIONS, Params, load_params
from flows.dag import load_stages, topological_order
from tasks.stage import OUTPUT_PATHS

ROOT = Path(__file__).resolve().parents[2]

# rag_index keys read at query time (`posttrain rag query/ask/eval`, the rag_eval stage), never by
# the rag_index stage: changing one must not re-index. They are the keys from top_k on in
# RagIndexConfig (tested below), listed here by name so a new key has to be classified on purpose.
QUERY_TIME_ONLY = {
    "rag_index.top_k",
    "rag_index.mode",
    "rag_index.fusion",
    "rag_index.rrf_k",
    "rag_index.dense_weight",
    "rag_index.expansion",
    "rag_index.expansion_queries",
    "rag_index.rerank",
    "rag_index.reranker",
    "rag_index.ql_model",
    "rag_index.candidates",
    "rag_index.answer_mode",
    "rag_index.generator",
    "rag_index.min_support",
    "rag_index.context_tokens",
}

STAGE_OUT_PATH = OUTPUT_PATHS  # the map run_stage uses to find each output's config/manifest


@pytest.fixture(scope="module")
def stages() -> dict[str, dict[str, Any]]:
    return load_stages(ROOT)


@pytest.fixture(scope="module")
def shipped() -> dict[str, Any]:
    return read_params(ROOT / "params.yaml")


def _entries(entries: list[Any] | None) -> list[str]:
    """dvc.yaml list entries are either ``path`` or ``{path: {options}}``."""
    out: list[str] = []
    for entry in entries or []:
        if isinstance(entry, dict):
            out.extend(entry)
        else:
            out.append(entry)
    return out


def _stage_params(stage: dict[str, Any]) -> set[str]:
    """A stage's ``params:`` keys (string entries, or ``{params_file: [keys]}`` entries)."""
    keys: set[str] = set()
    for entry in stage.get("params", []) or []:
        if isinstance(entry, dict):
            for file, file_keys in entry.items():
                assert Path(file).name == "params.yaml", f"unexpected params file {file}"
                keys.update(file_keys or [])
        else:
            keys.add(entry)
    return keys


# (1) ------------------------------------------------------------------ params.yaml == dataclass defaults


def test_shipped_params_equal_the_dataclass_defaults():
    assert load_params(ROOT / "params.yaml") == Params()


def test_shipped_params_spell_out_every_key(shipped):
    # equality above would also hold if params.yaml omitted keys; the shipped file must list them all
    assert set(flatten(shipped)) == set(flatten(to_dict(Params())))


# (2) ------------------------------------------------------------------ dvc params <-> params.yaml


def test_every_dvc_param_key_exists_in_params_yaml(stages, shipped):
    known = set(flatten(shipped))
    for name, stage in stages.items():
        missing = sorted(_stage_params(stage) - known)
        assert not missing, f"dvc.yaml stage {name!r} depends on keys not in params.yaml: {missing}"


def test_every_stage_section_key_is_a_dvc_param_of_that_stage(stages, shipped):
    for name, stage in stages.items():
        section_keys = set(flatten(shipped.get(name, {}), f"{name}."))
        missing = sorted(section_keys - _stage_params(stage) - QUERY_TIME_ONLY)
        assert not missing, f"dvc.yaml stage {name!r} does not list params {missing}"


def test_query_time_keys_are_real_but_not_stage_dependencies(stages, shipped):
    flat = flatten(shipped)
    for key in QUERY_TIME_ONLY:
        assert key in flat  # the exception list must not hide a key that no longer exists
        assert key not in _stage_params(stages["rag_index"])  # changing top_k must not re-index


def test_query_time_keys_are_the_rag_index_keys_from_top_k_on(stages):
    from dataclasses import fields

    from components.params import RagIndexConfig
    from tasks.rag_index import BUILD_KEYS

    names = [f.name for f in fields(RagIndexConfig)]
    build, query = names[: names.index("top_k")], names[names.index("top_k") :]
    assert {f"rag_index.{k}" for k in query} == QUERY_TIME_ONLY
    # the build keys are exactly what the stage records (config.yaml) and what dvc.yaml re-runs it for
    assert list(BUILD_KEYS) == build
    assert {k for k in _stage_params(stages["rag_index"]) if k.startswith("rag_index.")} == {
        f"rag_index.{k}" for k in build
    }


# (3) ------------------------------------------------------------------ sections <-> stages


def test_every_stage_section_is_a_dvc_stage(stages):
    expected = set(SECTIONS) - {"paths", "tracking", "compute"}  # shared sections, not stages
    assert expected <= set(stages), f"sections without a dvc stage: {sorted(expected - set(stages))}"
    assert set(stages) <= set(SECTIONS), (
        f"stages without a params section: {sorted(set(stages) - set(SECTIONS))}"
    )


def test_compute_keys_are_params_of_exactly_the_training_stages(stages, shipped):
    from components.distributed import TRAINING_STAGES

    compute_keys = set(flatten(shipped["compute"], "compute."))
    assert compute_keys == {
        "compute.device",
        "compute.precision",
        "compute.processes",
        "compute.gradient_checkpointing",
        "compute.checkpoint_steps",
    }
    assert TRAINING_STAGES <= set(stages)
    for name, stage in stages.items():
        listed = compute_keys & _stage_params(stage)
        if name in TRAINING_STAGES:  # device, precision and process count change the trained weights
            assert listed == compute_keys, f"{name} misses {sorted(compute_keys - listed)}"
        else:  # the other stages ignore the section: editing it must not re-run them
            assert not listed, f"{name} depends on {sorted(listed)}"


# (4) ------------------------------------------------------------------ outs and metrics


def test_stage_outs_are_the_configured_paths(stages):
    paths = Params().paths
    assert set(STAGE_OUT_PATH) <= set(stages)
    for name, field in STAGE_OUT_PATH.items():
        assert _entries(stages[name].get("outs")) == [getattr(paths, field)], name


def test_every_stage_writes_its_metrics_file(stages):
    metrics_dir = Params().paths.metrics
    for name, stage in stages.items():
        assert f"{metrics_dir}/{name}.json" in _entries(stage.get("metrics")), name


# (5) ------------------------------------------------------------------ flow order and commands


def _producers(stages: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {out: name for name, stage in stages.items() for out in _entries(stage.get("outs"))}


def _depends_on(dep: str, out: str) -> bool:
    d, o = Path(dep).parts, Path(out).parts
    return d[: len(o)] == o or o[: len(d)] == d


def test_flow_order_is_a_topological_order_of_dvc_yaml(stages):
    order = topological_order(load_stages(ROOT))
    assert sorted(order) == sorted(stages)  # every stage exactly once
    position = {name: i for i, name in enumerate(order)}
    producers = _producers(stages)
    edges = 0
    for name, stage in stages.items():
        for dep in _entries(stage.get("deps")):
            for out, producer in producers.items():
                if producer != name and _depends_on(dep, out):
                    edges += 1
                    assert position[producer] < position[name], (
                        f"{name} (reads {dep}) runs before {producer} (writes {out})"
                    )
    assert edges > 0  # the check above must have had something to check


def test_dag_edges_include_the_documented_chain(stages):
    order = topological_order(stages)
    chain = ["base", "ingest", "sft", "preferences", "reward_model", "align", "compress", "evaluate"]
    producers = _producers(stages)
    for before, after in [("base", "sft"), ("ingest", "sft"), ("sft", "preferences"), ("align", "compress")]:
        reads = _entries(stages[after].get("deps"))
        assert any(_depends_on(d, o) for d in reads for o, p in producers.items() if p == before), (
            f"{after} does not read {before}'s outputs"
        )
    for before, after in zip(chain, chain[1:], strict=False):
        if (before, after) in {("base", "ingest")}:
            continue  # independent: either may run first
        assert order.index(before) < order.index(after)


@pytest.mark.parametrize("name", list(load_stages(ROOT)))
def test_stage_command_is_its_task_module(name, stages):
    assert stages[name]["cmd"].strip() == f"python -m tasks.{name}"
    assert (ROOT / "tasks" / f"{name}.py").is_file()


def test_stage_deps_exist_or_are_produced(stages):
    producers = _producers(stages)
    for name, stage in stages.items():
        for dep in _entries(stage.get("deps")):
            produced = any(_depends_on(dep, out) for out in producers)
            assert produced or (ROOT / dep).exists(), (
                f"stage {name!r}: dep {dep} neither exists nor is produced"
            )


# (6) ------------------------------------------------------------------ layering

FORBIDDEN_IMPORT = re.compile(r"^\s*(import|from)\s+(prefect|mlflow|dvc)\b", re.MULTILINE)


def test_forbidden_import_regex_catches_what_it_should():
    for line in [
        "import mlflow",
        "from prefect import flow",
        "    import dvc.api",
        "from mlflow.tracking import X",
    ]:
        assert FORBIDDEN_IMPORT.search(line), line
    for line in ["import mlflowx", "from components.tracking import Tracker", "# mlflow is not imported"]:
        assert not FORBIDDEN_IMPORT.search(line), line


def test_components_never_import_orchestration_or_tracking():
    files = sorted((ROOT / "components").rglob("*.py"))
    assert len(files) > 5
    offenders = [
        f"{path.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 1}: {m.group(0).strip()}"
        for path in files
        for text in [path.read_text()]
        for m in FORBIDDEN_IMPORT.finditer(text)
    ]
    assert not offenders, offenders
