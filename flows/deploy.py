"""Schedules: run the post-training flow on a cron or interval schedule through a Prefect server.

Prefect's ephemeral API cannot schedule flow runs, so a schedule needs a real server:

* ``posttrain serve`` uses the server at ``PREFECT_API_URL`` when it is set; otherwise it starts
  ``prefect server start`` on 127.0.0.1 (a free port) for the life of the command, points this
  process at it, and stops it on exit (Ctrl-C included). The served deployment runs its
  scheduled flow runs from this process.
* ``posttrain deploy`` registers a deployment in a ``process`` work pool on the server at
  ``PREFECT_API_URL`` (creating the pool if missing); ``prefect worker start --pool NAME`` runs
  its flow runs.

Both deployments have a concurrency limit of 1: a scheduled run that comes due while the
previous one is still running waits instead of overlapping it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from components.errors import PosttrainError

DESCRIPTION = "Re-run the post-training DAG; DVC skips every stage whose inputs did not change."
FLOWS: tuple[str, ...] = ("post-training", "rag-refresh")
DESCRIPTIONS = {
    "post-training": DESCRIPTION,
    "rag-refresh": "Re-index the documents that changed since the RAG index was built.",
}


def _flow(name: str) -> Any:
    """The Prefect flow object for a ``--flow`` name."""
    if name == "rag-refresh":
        from flows.rag_refresh import rag_refresh

        return rag_refresh
    if name != "post-training":
        raise PosttrainError(f"--flow {name!r}: choose from {', '.join(FLOWS)}")
    from flows.post_training import post_training

    return post_training


def validate_schedule(cron: str | None, interval: float | None) -> dict[str, Any]:
    """``{"cron": ...}`` or ``{"interval": ...}``; a bad value raises a one-line PosttrainError."""
    if (cron is None) == (interval is None):
        raise PosttrainError("give exactly one of --cron and --interval")
    if cron is not None:
        from prefect.client.schemas.schedules import CronSchedule
        from pydantic import ValidationError

        try:
            CronSchedule(cron=cron)
        except (ValidationError, ValueError):
            raise PosttrainError(f"--cron {cron!r}: not a valid cron expression") from None
        return {"cron": cron}
    if not interval or interval <= 0:
        raise PosttrainError(f"--interval {interval!r}: must be a positive number of seconds")
    return {"interval": interval}


def _parameters(repo_dir: str, stages: list[str] | None, flow_name: str = "post-training") -> dict[str, Any]:
    parameters: dict[str, Any] = {"repo_dir": repo_dir}
    if stages and flow_name == "rag-refresh":
        raise PosttrainError(
            "--stages applies to the post-training flow only (rag-refresh runs the RAG stages)"
        )
    if stages:
        parameters["stages"] = list(stages)
    return parameters


def build_deployment(
    cron: str | None = None,
    name: str = "posttrain-scheduled",
    repo_dir: str = ".",
    interval: float | None = None,
    stages: list[str] | None = None,
    flow_name: str = "post-training",
) -> Any:
    """The deployment object (flow + schedule + parameters), without serving it."""
    return _flow(flow_name).to_deployment(
        name=name,
        **validate_schedule(cron, interval),
        parameters=_parameters(repo_dir, stages, flow_name),
        description=DESCRIPTIONS[flow_name],
        tags=["posttrain"],
        concurrency_limit=1,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _prefect_cli() -> list[str]:
    exe = Path(sys.executable).with_name("prefect")
    return [str(exe)] if exe.exists() else [shutil.which("prefect") or "prefect"]


@contextlib.contextmanager
def local_server(timeout: float = 90.0) -> Iterator[str]:
    """Run ``prefect server start`` on a free 127.0.0.1 port until the block exits; yield its API URL."""
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    cmd = [*_prefect_cli(), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    print(
        f"starting a local Prefect server on http://127.0.0.1:{port} (stopped when this command ends)",
        flush=True,
    )
    from tasks.stage import die_with_parent

    # The server dies with this process even when it is SIGKILLed (a `finally` never runs then).
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=die_with_parent
    )
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(api_url):
            if proc.poll() is not None:
                err = (proc.stderr.read().decode(errors="replace").strip().splitlines() or ["no output"])[-1]
                raise PosttrainError(f"local Prefect server exited with code {proc.returncode}: {err}")
            if time.monotonic() > deadline:
                raise PosttrainError(
                    f"local Prefect server did not answer {api_url}/health within {timeout:.0f} s "
                    "(set PREFECT_API_URL to use a running server)"
                )
            time.sleep(0.5)
        yield api_url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def _api(api_url: str) -> Iterator[None]:
    """Point this process (and the flow-run subprocesses it starts) at ``api_url``."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    os.environ["PREFECT_API_URL"] = api_url
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        yield


@contextlib.contextmanager
def prefect_server() -> Iterator[str]:
    """The server at ``PREFECT_API_URL``, or a local one for the life of the block."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        with _api(url):
            yield url
        return
    with local_server() as url, _api(url):
        yield url


def serve(
    cron: str | None = None,
    name: str = "posttrain-scheduled",
    repo_dir: str = ".",
    interval: float | None = None,
    stages: list[str] | None = None,
    flow_name: str = "post-training",
) -> None:
    """Serve the flow (``post-training`` or ``rag-refresh``) on ``cron`` or every ``interval`` seconds."""
    schedule = validate_schedule(cron, interval)  # before any server starts
    parameters = _parameters(repo_dir, stages, flow_name)
    if flow_name not in FLOWS:
        raise PosttrainError(f"--flow {flow_name!r}: choose from {', '.join(FLOWS)}")
    with prefect_server():
        flow_obj = _flow(flow_name)  # the flow modules import Prefect: only once the server URL is set
        flow_obj.serve(
            name=name,
            **schedule,
            parameters=parameters,
            description=DESCRIPTIONS[flow_name],
            tags=["posttrain"],
            global_limit=1,  # no overlapping runs, even across several `posttrain serve`
            limit=1,
        )


def ensure_process_pool(pool: str) -> None:
    """Create the ``process`` work pool ``pool`` on the current server unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            print(f"created process work pool {pool!r}")


def deploy(
    pool: str,
    cron: str | None = None,
    name: str = "posttrain-scheduled",
    repo_dir: str = ".",
    interval: float | None = None,
    stages: list[str] | None = None,
    flow_name: str = "post-training",
) -> str:
    """Register the deployment in the process work pool ``pool``; returns the deployment id."""
    schedule = validate_schedule(cron, interval)
    parameters = _parameters(repo_dir, stages, flow_name)
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        raise PosttrainError(
            "PREFECT_API_URL is not set: a work-pool deployment needs a Prefect server "
            "(prefect server start, then export PREFECT_API_URL=http://127.0.0.1:4200/api)"
        )
    with _api(url):
        from prefect import deploy as prefect_deploy
        from prefect.deployments.runner import EntrypointType

        ensure_process_pool(pool)
        # A module entrypoint (`flows.post_training`, importable wherever this package is
        # installed) needs no code storage; the worker starts each run in `repo_dir`.
        deployment = _flow(flow_name).to_deployment(
            name=name,
            **schedule,
            parameters=parameters,
            description=DESCRIPTIONS[flow_name],
            tags=["posttrain"],
            concurrency_limit=1,
            work_pool_name=pool,
            job_variables={"working_dir": repo_dir},
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        (deployment_id,) = prefect_deploy(
            deployment, work_pool_name=pool, build=False, push=False, print_next_steps_message=False
        )
    return str(deployment_id)
