"""Failures keep the last good state, user errors run once in one line, transient ones are retried.

A tiny git + DVC project with ``ingest`` (no model needed) and a test-only stage ``flaky`` whose
command (a script in the temp project, not production code) kills itself on its first attempt.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import ROOT, make_project

FLAKY = """\
import os, signal
from pathlib import Path

attempts = Path("flaky.attempts")
n = int(attempts.read_text()) if attempts.exists() else 0
attempts.write_text(str(n + 1))
if n == 0:
    os.kill(os.getpid(), signal.SIGKILL)  # a transient failure: an OOM kill, a preempted node
Path("flaky.out").write_text("ok\\n")
"""


def sh(cmd: list[str], cwd: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900, **kw)
    if check:
        assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _env(repo: Path) -> dict[str, str]:
    env = dict(os.environ, PREFECT_HOME=str(repo.parent / "prefect"), PREFECT_LOGGING_TO_API_ENABLED="false")
    env.pop("POSTTRAIN_PARENT_RUN_ID", None)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def posttrain(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return sh([str(Path(sys.executable).parent / "posttrain"), *args], repo, check=False, env=_env(repo))


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "dvc", *args], repo, check=check, env=_env(repo))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_project(tmp_path_factory.mktemp("failures") / "repo")
    shutil.copy(ROOT / ".gitignore", root / ".gitignore")
    (root / "flaky.py").write_text(FLAKY)
    spec = yaml.safe_load((root / "dvc.yaml").read_text())
    spec["stages"]["flaky"] = {"cmd": "python flaky.py", "deps": ["flaky.py"], "outs": ["flaky.out"]}
    (root / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    sh(["git", "init", "-q"], root)
    sh(["git", "config", "user.email", "t@example.com"], root)
    sh(["git", "config", "user.name", "t"], root)
    dvc(root, "init", "-q")
    dvc(root, "repro", "ingest")  # the last good state
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "good ingest"], root)
    return root


def fingerprint(repo: Path) -> dict[str, str]:
    """md5 of every file of ``data/processed`` and of ``metrics/ingest.json``."""
    files = sorted((repo / "data/processed").rglob("*")) + [repo / "metrics/ingest.json"]
    return {str(f.relative_to(repo)): hashlib.md5(f.read_bytes()).hexdigest() for f in files if f.is_file()}


@pytest.fixture
def malformed_sft_data(repo: Path):
    bad = repo / "mine.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": \n')
    original = (repo / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["ingest"]["sft_data"] = "mine.jsonl"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    yield bad
    (repo / "params.yaml").write_text(original)
    bad.unlink()


@pytest.mark.slow
def test_user_error_under_posttrain_run_runs_once_in_one_line_and_keeps_outputs(
    repo: Path, malformed_sft_data: Path
) -> None:
    before = fingerprint(repo)
    assert len(before) > 1 and "metrics/ingest.json" in before
    proc = posttrain(repo, "run", "--stages", "ingest")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert out.count("Running stage 'ingest'") == 1, "a user error must not be retried"
    assert "Retry" not in out and "Traceback" not in out, out[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("posttrain run: error:")]
    message = "mine.jsonl:2: not valid JSON (Expecting value at column 1)"
    assert errors == [f"posttrain run: error: stage 'ingest': {message}"]
    assert fingerprint(repo) == before  # data/processed and metrics/ingest.json: same md5
    assert not [p for p in (repo / "data").iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.slow
def test_user_error_under_plain_dvc_repro_keeps_outputs(repo: Path, malformed_sft_data: Path) -> None:
    before = fingerprint(repo)
    # Not even in the DVC cache (the run cache's copy): the copy the last good run kept is used.
    metrics_md5 = before["metrics/ingest.json"]
    cached = repo / ".dvc/cache/files/md5" / metrics_md5[:2] / metrics_md5[2:]
    cached.unlink()
    assert (repo / ".dvc/tmp/posttrain-keep" / metrics_md5).is_file()
    proc = dvc(repo, "repro", "ingest", check=False)
    assert proc.returncode != 0
    assert "mine.jsonl:2:" in proc.stderr
    assert fingerprint(repo) == before
    shutil.copyfile(repo / "metrics/ingest.json", cached)  # the same bytes are also in data/processed
    assert "modified: ingest.sft_data" in " ".join(dvc(repo, "status", "ingest").stdout.split())
    assert "outs" not in dvc(repo, "status", "ingest").stdout  # the outputs match dvc.lock


@pytest.mark.slow
def test_transient_failure_is_retried_once(repo: Path) -> None:
    proc = posttrain(repo, "run", "--stages", "flaky", "--no-track")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert (repo / "flaky.attempts").read_text() == "2"
    assert "Retry 1/1" in out
    assert (repo / "flaky.out").read_text() == "ok\n"


def _wait_for(predicate, timeout: float, what: str):  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _stage_process(root: psutil.Process, module: str) -> psutil.Process | None:
    for child in root.children(recursive=True):
        try:
            if module in child.cmdline():
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _kill_mid_training(repo: Path, cmd: list[str]) -> None:
    log_path = repo.parent / f"killed-{Path(cmd[0]).name}-{len(cmd)}.log"  # read back only on failure
    with log_path.open("wb") as log:  # the child writes through its own copy of the descriptor
        top = subprocess.Popen(cmd, cwd=repo, env=_env(repo), stdout=log, stderr=subprocess.STDOUT)
    try:
        parent = psutil.Process(top.pid)
        stage = _wait_for(lambda: _stage_process(parent, "tasks.base"), 240, "tasks.base to start")
        runner = stage.parent()  # the dvc process
        # Inside its run (its work dir exists): the stage has installed its parent-death signal.
        _wait_for(lambda: list((repo / "models").glob(".base.tmp-*")), 240, "base to start training")
        family = parent.children(recursive=True)
        top.send_signal(signal.SIGKILL)
        top.wait(timeout=30)
        _wait_for(lambda: runner is None or _gone(runner), 60, "dvc to stop")
        _wait_for(lambda: _gone(stage), 60, "the tasks.base process to stop")
        try:
            _wait_for(lambda: not list((repo / "models").glob(".base.tmp-*")), 30, "its work dir to go")
        except AssertionError as exc:  # say whose directory it is and what the stage printed
            left = [p.name for p in (repo / "models").glob(".base.tmp-*")]
            tail = log_path.read_bytes()[-3000:].decode(errors="replace")
            raise AssertionError(f"{exc}: {left} left; stage pid {stage.pid}; output tail:\n{tail}") from None
        # `posttrain run`'s temporary Prefect server (uvicorn) outlives a SIGKILL of its parent; it
        # is not a stage, but left running it holds a port and CPU for the rest of the suite.
        for leftover in family:
            with contextlib.suppress(psutil.Error):
                if not _gone(leftover) and "uvicorn" in " ".join(leftover.cmdline()):
                    leftover.kill()
    finally:
        if top.poll() is None:
            top.kill()
            top.wait()


@pytest.mark.slow
def test_killing_dvc_or_the_flow_stops_the_stage(repo: Path) -> None:
    """SIGKILL ``dvc repro base``, then ``posttrain run``, mid-training: no stage keeps running."""
    _kill_mid_training(repo, [sys.executable, "-m", "dvc", "repro", "base"])
    _kill_mid_training(repo, [str(Path(sys.executable).parent / "posttrain"), "run", "--stages", "base"])


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_run_whose_process_died_is_marked_killed(tiny_project: Path) -> None:
    import socket

    from mlflow.tracking import MlflowClient

    from components.params import load_params
    from tasks import ingest
    from tasks.stage import run_stage
    from tasks.tracking import HOST_TAG, PID_TAG, configure

    exp_id = configure(load_params(tiny_project / "params.yaml").tracking, root=tiny_project)
    client = MlflowClient()
    host = socket.gethostname()
    dead = client.create_run(exp_id, run_name="sft", tags={PID_TAG: str(_dead_pid()), HOST_TAG: host})
    alive = client.create_run(exp_id, run_name="sft", tags={PID_TAG: str(os.getppid()), HOST_TAG: host})
    elsewhere = client.create_run(exp_id, run_name="sft", tags={PID_TAG: str(_dead_pid()), HOST_TAG: "other"})
    run_stage("ingest", ingest.run)  # plain dvc repro: the stage command does the housekeeping
    assert client.get_run(dead.info.run_id).info.status == "KILLED"
    assert "died" in client.get_run(dead.info.run_id).data.tags["posttrain.end_reason"]
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"
    assert client.get_run(elsewhere.info.run_id).info.status == "RUNNING"
    (stage_run,) = client.search_runs([exp_id], filter_string="attributes.run_name = 'ingest'")
    assert stage_run.info.status == "FINISHED"
    assert stage_run.data.tags[PID_TAG] == str(os.getpid()) and stage_run.data.tags[HOST_TAG] == host
