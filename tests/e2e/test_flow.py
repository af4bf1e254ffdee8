"""The whole DAG through Prefect on the tiny config, then a no-op re-run and a one-param change.

Runs ``posttrain`` as a user would (a subprocess in a fresh git + DVC repo) and checks what a
user relies on: ``dvc.lock`` covers every stage, every metrics file exists, MLflow has one
parent run with a nested run per stage, the Milvus collection holds the docs, a second run
trains nothing, editing ``sft.learning_rate`` makes sft and its descendants (only) stale, a
changed ``compress`` key re-runs exactly compress and evaluate, and
``dvc push``/``pull`` restore the outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_repo, sh

pytestmark = pytest.mark.slow

STAGES = [
    "base",
    "ingest",
    "sft",
    "preferences",
    "reward_model",
    "align",
    "compress",
    "evaluate",
    "rag_index",
    "rag_reranker",
    "rag_eval",
    "multimodal",
]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    parent = tmp_path_factory.mktemp("e2e")
    return make_repo(parent / "repo", remote=parent / "remote")


def posttrain(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PREFECT_HOME=str(repo.parent / "prefect"), PREFECT_LOGGING_TO_API_ENABLED="false")
    env.pop("POSTTRAIN_PARENT_RUN_ID", None)
    return sh([str(Path(sys.executable).parent / "posttrain"), *args], repo, env=env)


def mlflow_runs(repo: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("posttrain")
    return client.search_runs([exp.experiment_id])


def test_full_run_then_noop_then_param_change(repo: Path) -> None:
    first = posttrain(repo, "run")
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    for stage in STAGES:
        assert (repo / f"metrics/{stage}.json").is_file(), stage
    evaluate = json.loads((repo / "metrics/evaluate.json").read_text())
    for model in ("base", "sft", "aligned", "compressed"):
        assert {"accuracy", "reward_mean", "perplexity"} <= set(evaluate[model])
    assert {"reward_model_pairwise_accuracy", "kl_aligned_vs_sft"} <= set(evaluate)
    compress = json.loads((repo / "metrics/compress.json").read_text())
    assert {"size_bytes_full", "size_bytes_compressed", "compression_ratio", "fidelity_kl"} <= set(compress)
    assert f"{len(STAGES)} stage(s) executed" in first.stdout

    runs = mlflow_runs(repo)
    parents = [r for r in runs if r.info.run_name == "post-training"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(STAGES)

    from components.rag.store import open_store

    with open_store(str(repo / "data/rag/milvus.db"), "posttrain_docs") as store:
        sources = store.sources()
    n_docs = json.loads((repo / "metrics/rag_index.json").read_text())["n_documents"]
    assert len(sources) == n_docs == len(list((repo / "data/docs").iterdir()))

    # Nothing changed: DVC says so before Prefect starts, and nothing is logged (nothing happened).
    second = posttrain(repo, "run")
    assert (
        f"0 stage(s) executed, {len(STAGES)} up to date (nothing changed: Prefect not started)"
        in second.stdout
    )
    assert "Starting temporary server" not in second.stdout + second.stderr
    assert len(mlflow_runs(repo)) == len(runs)

    # The verifier changed: the stages that grade with it are stale, and only their descendants.
    verifier = repo / "components/data/verifier.py"
    original = verifier.read_text()
    verifier.write_text(original + "\n# graded differently now\n")
    status = posttrain(repo, "status").stdout
    state = {line.split()[0]: line.split()[1] for line in status.splitlines() if line.strip()}
    assert {"preferences", "evaluate"} <= {s for s, v in state.items() if v == "stale"}, status
    assert state["base"] == state["rag_index"] == "up", status
    verifier.write_text(original)

    # One param changed: sft and its descendants are stale; base, ingest and the rag stages are not.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    shipped = yaml.safe_dump(params, sort_keys=False)
    params["sft"]["learning_rate"] = 0.004
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = posttrain(repo, "status").stdout
    state = {line.split()[0]: line.split()[1] for line in status.splitlines() if line.strip()}
    assert {s for s, v in state.items() if v == "stale"} == {
        "sft",
        "preferences",
        "reward_model",
        "align",
        "compress",
        "evaluate",
        "multimodal",
    }
    # Run a change with fewer descendants (the same mechanism, a third of the training time):
    # exactly compress and evaluate re-run.
    params = yaml.safe_load(shipped)
    params["compress"]["n_fidelity_prompts"] = 4
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = posttrain(repo, "run")
    assert f"2 stage(s) executed, {len(STAGES) - 2} up to date" in third.stdout
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["compress"]["params"]["params.yaml"]["compress.n_fidelity_prompts"] == 4

    # Two pipeline runs compare side by side: the parent runs carry params, metrics and lineage.
    parents = sorted(
        (r for r in mlflow_runs(repo) if r.info.run_name == "post-training"), key=lambda r: r.info.start_time
    )
    first_run, last_run = parents[0], parents[-1]
    assert (
        first_run.data.params["compress.n_fidelity_prompts"],
        last_run.data.params["compress.n_fidelity_prompts"],
    ) == ("8", "4")
    assert (
        "sft.accuracy" in last_run.data.metrics and last_run.data.tags["posttrain.dvc_lock_sha256"] != "none"
    )
    evaluate_now = json.loads((repo / "metrics/evaluate.json").read_text())
    assert last_run.data.metrics["sft.perplexity"] == pytest.approx(evaluate_now["sft"]["perplexity"])
    table = posttrain(repo, "runs", "-n", "3").stdout
    row = next(line for line in table.splitlines() if line.startswith("compress.n_fidelity_prompts"))
    assert row.split()[1:] == ["4", "8"], table

    # The local DVC remote round-trips the outputs.
    sh([sys.executable, "-m", "dvc", "push", "-q"], repo)
    before = (repo / "models/sft/adapter_model.safetensors").read_bytes()
    shutil.rmtree(repo / "models/sft")
    shutil.rmtree(repo / ".dvc/cache")
    sh([sys.executable, "-m", "dvc", "pull", "-q", "sft"], repo)
    assert (repo / "models/sft/adapter_model.safetensors").read_bytes() == before
