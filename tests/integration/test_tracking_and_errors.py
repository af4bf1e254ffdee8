"""Stage commands against real MLflow (sqlite) and their behaviour on bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tasks import ingest
from tasks.stage import run_stage
from tasks.tracking import PARENT_RUN_ENV, configure


def _client(project: Path) -> MlflowClient:
    from components.params import load_params

    configure(load_params(project / "params.yaml").tracking, root=project)
    return MlflowClient()


def test_stage_logs_params_metrics_and_artifacts_to_mlflow(tiny_project: Path) -> None:
    metrics = run_stage("ingest", ingest.run)
    client = _client(tiny_project)
    exp = client.get_experiment_by_name("posttrain")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "ingest" and run.info.status == "FINISHED"
    assert run.data.params["ingest.n_sft_train"] == "160"
    assert run.data.metrics["n_sft_train"] == metrics["n_sft_train"] == 160
    assert "mlflow.parentRunId" not in run.data.tags, "plain dvc repro opens a top-level run"
    assert run.data.tags["posttrain.code_version"]  # the commit lives in MLflow, not in the output
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "ingest.json" in artifacts
    assert exp.artifact_location.startswith("file://") and "mlartifacts" in exp.artifact_location
    assert (tiny_project / "metrics/ingest.json").is_file()


def test_stage_nests_under_the_parent_run_from_the_environment(
    tiny_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = _client(tiny_project)
    exp_id = client.get_experiment_by_name("posttrain").experiment_id
    with mlflow.start_run(experiment_id=exp_id, run_name="post-training") as parent:
        monkeypatch.setenv(PARENT_RUN_ENV, parent.info.run_id)
    run_stage("ingest", ingest.run)
    children = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert [c.info.run_name for c in children] == ["ingest"]


def _stage_cli(project: Path, stage: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop(PARENT_RUN_ENV, None)
    return subprocess.run(
        [sys.executable, "-m", f"tasks.{stage}"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _set_params(project: Path, section: str, **values) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params))


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("posttrain ")]


@pytest.mark.slow
def test_malformed_jsonl_names_file_and_line_and_writes_nothing(tiny_project: Path) -> None:
    bad = tiny_project / "mine.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": \n')
    _set_params(tiny_project, "ingest", sft_data=str(bad))
    proc = _stage_cli(tiny_project, "ingest")
    assert proc.returncode == 2
    (line,) = _error_lines(proc)
    assert f"{bad}:2:" in line and "Traceback" not in proc.stderr
    assert not (tiny_project / "data/processed").exists()
    assert not [p for p in (tiny_project / "data").iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_unknown_params_key_names_the_dotted_key(tiny_project: Path) -> None:
    _set_params(tiny_project, "sft", learning_rat=0.1)
    proc = _stage_cli(tiny_project, "ingest")
    assert proc.returncode == 2
    (line,) = _error_lines(proc)
    assert "sft.learning_rat: unknown key" in line


@pytest.mark.slow
def test_missing_input_is_one_clear_line(tiny_project: Path) -> None:
    proc = _stage_cli(tiny_project, "sft")  # base and ingest never ran
    assert proc.returncode == 2
    (line,) = _error_lines(proc)
    assert "models/base" in line and "not found" in line
    assert not (tiny_project / "models/sft").exists()
