"""The pipeline against a real ``mlflow server`` on 127.0.0.1 (sqlite backend, proxied artifacts).

``tracking.tracking_uri: http://127.0.0.1:PORT`` is the only change: stage runs nest under a
parent run, the adapter lands in the server's artifact store (not in a local ``mlartifacts/``),
and the gate registers the candidate and moves ``champion`` to the version its own run made,
all checked through ``MlflowClient`` against the server.
"""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from components.params import load_params
from tests.conftest import make_project

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server did not start: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.5)
    yield url, root / "artifacts"
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)


def test_pipeline_logs_nests_and_registers_on_a_tracking_server(
    server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, artifacts = server
    project = make_project(tmp_path / "project")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tracking"] |= {"tracking_uri": url, "log_models": "all"}
    params["compress"]["method"] = "none"
    params["align"]["dpo"]["learning_rate"] = 0.0  # the candidate equals SFT: the gate must pass
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(project)

    from tasks.tracking import configure

    experiment = configure(load_params("params.yaml").tracking)  # created by our code, on the server
    client = MlflowClient(tracking_uri=url)
    assert client.get_experiment(experiment).tags["mlflow.experimentKind"] == "custom_model_development"
    parent = client.create_run(experiment, run_name="post-training")
    monkeypatch.setenv("POSTTRAIN_PARENT_RUN_ID", parent.info.run_id)
    from tasks.stage import run_stage

    for stage in ("base", "ingest", "sft", "preferences", "reward_model", "align", "compress", "evaluate"):
        run_stage(stage, importlib.import_module(f"tasks.{stage}").run)
    from tasks.promote import promote
    from tasks.tracking import stage_run

    loaded = load_params("params.yaml")
    with stage_run("promote", loaded.tracking) as tracker:
        decision = promote(loaded, tracker)
    client.set_terminated(parent.info.run_id)

    runs = client.search_runs([experiment])
    children = {
        r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == {
        "base",
        "ingest",
        "sft",
        "preferences",
        "reward_model",
        "align",
        "compress",
        "evaluate",
        "promote",
    }
    assert all(r.info.status == "FINISHED" for r in children.values())
    sft = children["sft"]
    assert "model/adapter_model.safetensors" in {
        a.path for a in client.list_artifacts(sft.info.run_id, "model")
    }
    assert sft.data.metrics["final_loss"] < sft.data.metrics["first_loss"]
    # the bytes went through the server into its artifact store, not into the project
    assert list(artifacts.rglob("adapter_model.safetensors")) and not (project / "mlartifacts").exists()

    assert decision["promoted"], decision

    # A forced re-run of base writes the same bytes: the model is not logged a second time.
    run_stage("base", importlib.import_module("tasks.base").run)
    base_runs = [r for r in client.search_runs([experiment]) if r.info.run_name == "base"]
    rerun = max(base_runs, key=lambda r: r.info.start_time)
    assert rerun.data.tags["posttrain.model_logged_in_run"] == children["base"].info.run_id
    logged = [m for m in client.search_logged_models([experiment]) if m.name == "base"]
    assert [m.source_run_id for m in logged] == [children["base"].info.run_id]
    version = client.get_model_version_by_alias("posttrain-policy", "champion")
    assert version.version == decision["version"] and version.run_id == children["promote"].info.run_id
