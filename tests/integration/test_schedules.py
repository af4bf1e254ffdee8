"""Schedules fire: served deployments and a work-pool deployment each complete a flow run.

``posttrain serve`` with no PREFECT_API_URL starts (and stops) its own local server; the other
cases use a real ``prefect server`` on 127.0.0.1 (free port, temporary PREFECT_HOME) through
PREFECT_API_URL. ``posttrain serve`` / ``posttrain deploy`` + ``prefect worker`` run as
subprocesses in a fresh git + DVC project; the post-training runs select only the cheap
``ingest`` stage.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import make_repo

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TIMEOUT = 180


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A Prefect server; yields the environment that points a client at it."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = (home / "server.log").open("w")
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while not _healthy(url):
        assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "prefect server did not come up"
        time.sleep(0.5)
    try:
        yield {**env, "PREFECT_API_URL": url}
    finally:
        _stop(proc)
        log.close()


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repo(tmp_path_factory.mktemp("sched") / "repo")


def _wait_for_completed_run(env: dict[str, str], deployment: str, procs: list[subprocess.Popen]) -> float:
    """Seconds until a flow run of ``deployment`` is COMPLETED; fails on a failed run or dead process."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    start = time.monotonic()
    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            dep_id = None
            while time.monotonic() - start < TIMEOUT:
                for proc in procs:
                    assert proc.poll() is None, f"{proc.args} exited with {proc.returncode}"
                if dep_id is None:
                    try:
                        dep_id = client.read_deployment_by_name(deployment).id
                    except Exception:  # not registered yet
                        time.sleep(1)
                        continue
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep_id]))
                )
                states = [r.state_type.value for r in runs if r.state_type]
                assert not {"FAILED", "CRASHED"} & set(states), states
                if "COMPLETED" in states:
                    return time.monotonic() - start
                time.sleep(2)
    raise AssertionError(f"no COMPLETED run of {deployment} within {TIMEOUT} s (states: {states})")


def _deployment(env: dict[str, str], name: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            return client.read_deployment_by_name(name)


def _popen(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def test_work_pool_deployment_runs_on_a_worker(server: dict[str, str], project: Path) -> None:
    proc = subprocess.run(
        [str(BIN / "posttrain"), "deploy", "--pool", "p", "--interval", "3600", "--stages", "ingest"],
        cwd=project,
        env=server,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "prefect worker start --pool p" in proc.stdout
    deployment = _deployment(server, "post-training/posttrain-scheduled")
    assert deployment.work_pool_name == "p"
    assert deployment.global_concurrency_limit and deployment.global_concurrency_limit.limit == 1

    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server["PREFECT_API_URL"]}):
        run = run_deployment("post-training/posttrain-scheduled", timeout=0)
    log = project.parent / "worker.log"
    worker = _popen([str(BIN / "prefect"), "worker", "start", "--pool", "p"], project, server, log)
    try:
        elapsed = _wait_for_completed_run(server, "post-training/posttrain-scheduled", [worker])
        print(f"worker run {run.id} completed {elapsed:.0f} s after the worker started")
    except AssertionError:
        print(log.read_text()[-4000:])
        raise
    finally:
        _stop(worker, signal.SIGINT)


def test_serve_without_api_url_runs_the_schedule_on_its_own_server_then_stops_it(
    project: Path, tmp_path: Path
) -> None:
    """No PREFECT_API_URL: ``posttrain serve`` starts a local server, a run fires on the interval."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "home")
    env["PYTHONUNBUFFERED"] = "1"
    log = tmp_path / "serve.log"
    serve = _popen(
        [str(BIN / "posttrain"), "serve", "--interval", "10", "--stages", "ingest", "--name", "t-own"],
        project,
        env,
        log,
    )
    try:
        deadline = time.monotonic() + 120
        url = None
        while url is None:
            assert serve.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            for line in log.read_text().splitlines():
                if line.startswith("starting a local Prefect server on "):
                    url = line.split()[6] + "/api"
            time.sleep(1)
        own = {**env, "PREFECT_API_URL": url}
        elapsed = _wait_for_completed_run(own, "post-training/t-own", [serve])
        print(f"served run completed {elapsed:.0f} s after its deployment appeared")
        deployment = _deployment(own, "post-training/t-own")
        assert deployment.global_concurrency_limit and deployment.global_concurrency_limit.limit == 1
        assert deployment.parameters["stages"] == ["ingest"]
    except AssertionError:
        print(log.read_text()[-4000:])
        raise
    finally:
        _stop(serve, signal.SIGINT)  # Ctrl-C
    assert serve.returncode is not None
    assert (project / "data/processed").is_dir()
    assert "ephemeral" not in log.read_text()
    deadline = time.monotonic() + 30  # a graceful shutdown, or the parent-death signal after a kill
    while _healthy(url) and time.monotonic() < deadline:
        time.sleep(1)
    assert not _healthy(url), "the local server outlived `posttrain serve`"


def test_served_rag_refresh_runs_on_its_own_schedule(server: dict[str, str], project: Path) -> None:
    """``posttrain serve --flow rag-refresh``: a separate deployment that re-indexes the docs."""
    import yaml

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["rag_reranker"]["enabled"] = False  # keep the scheduled run short; training is tested elsewhere
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = project.parent / "serve-rag.log"
    serve = _popen(
        [str(BIN / "posttrain"), "serve", "--flow", "rag-refresh", "--interval", "10", "--name", "t-rag"],
        project,
        server,
        log,
    )
    try:
        _wait_for_completed_run(server, "rag-refresh/t-rag", [serve])
    except AssertionError:
        print(log.read_text()[-4000:])
        raise
    finally:
        _stop(serve, signal.SIGINT)
    assert (project / "data/rag/milvus.db").is_dir()
    assert (project / "metrics/rag_eval.json").is_file()
    assert _deployment(server, "rag-refresh/t-rag").parameters == {"repo_dir": str(project.resolve())}
