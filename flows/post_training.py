"""The post-training flow: one Prefect task per ``dvc.yaml`` stage, in topological order.

DVC decides *whether* a stage runs (content hashes in ``dvc.lock``); Prefect decides *how*
(retries, logs, UI, schedules). Each task runs ``dvc repro --single-item <stage>``, the very
command a user can type, one at a time because DVC holds a repo lock. The flow opens a parent
MLflow run and passes its id to the stage processes in ``POSTTRAIN_PARENT_RUN_ID``, so every
stage that actually runs becomes a nested run; an up-to-date stage is reported as skipped and
logs nothing.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from components.artifacts import keep_uncached_outputs
from components.errors import PosttrainError
from components.params import load_params
from flows.dag import changed_stages, load_stages, topological_order
from tasks.stage import ERROR_FILE_ENV  # where a stage writes its one-line user error

USER_ERROR_EXIT = 2  # stage commands exit 2 on bad input: retrying cannot help


class StageFailed(PosttrainError):
    """A stage command failed; its own output (above) says why."""

    def __init__(self, stage: str, returncode: int) -> None:
        super().__init__(f"stage '{stage}' failed with exit code {returncode} (its output is above)")
        self.stage = stage
        self.returncode = returncode


class StageUserError(StageFailed):
    """A stage rejected its input (exit 2 and a one-line message): retrying cannot help.

    ``posttrain run`` prints it as ``posttrain run: error: stage '<stage>': <message>``.
    """

    def __init__(self, stage: str, message: str) -> None:
        PosttrainError.__init__(self, f"stage '{stage}': {message}")
        self.stage = stage
        self.returncode = USER_ERROR_EXIT
        self.message = message


# ``python -m dvc`` that dies with the flow: Linux sends it SIGTERM when its parent (this process)
# dies, even by SIGKILL; it then dies and the stage below it gets the same (``tasks.stage``).
DVC_MAIN = (
    "import ctypes, signal, sys\n"
    "if sys.platform.startswith('linux'):\n"
    "    ctypes.CDLL(None).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG\n"
    "from dvc.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


class _NoTracebackForUserErrors(logging.Filter):
    """Prefect logs every failed task and flow with its traceback; a user error needs its line only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], StageUserError):
            record.exc_info = None
            record.exc_text = None
        return True


def _quiet_user_errors() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTracebackForUserErrors) for f in logger.filters):
            logger.addFilter(_NoTracebackForUserErrors())


def stage_env(parent_run_id: str | None) -> dict[str, str]:
    """The stage subprocess environment: our interpreter first on PATH and the parent run id.

    The offline/telemetry keys are already in ``os.environ`` (``components.environment``).
    """
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    if parent_run_id:
        env["POSTTRAIN_PARENT_RUN_ID"] = parent_run_id
    else:
        env.pop("POSTTRAIN_PARENT_RUN_ID", None)
    return env


def _not_user_error(task, task_run, state) -> bool:  # noqa: ANN001 - Prefect's retry_condition_fn signature
    """Retry a killed or crashed stage (exit code from DVC: 255), never a user error."""
    try:
        state.result()
    except StageUserError:
        return False
    except StageFailed as exc:
        return exc.returncode != USER_ERROR_EXIT
    except Exception:  # noqa: BLE001 - anything else (OOM kill, I/O) may be transient
        return True
    return False


@task(retries=1, retry_delay_seconds=5, retry_condition_fn=_not_user_error, task_run_name="{stage}")
def run_stage(stage: str, repo_dir: str, parent_run_id: str | None, force: bool = False) -> str:
    """Run one stage through DVC; returns ``ran``, ``restored`` (from DVC's run cache) or ``skipped``.

    Retrying is safe: stage outputs are written to temp dirs and renamed, so a failed attempt
    leaves nothing behind that the next attempt could mistake for a result. After a failure the
    outputs that DVC deleted before running the command are put back from ``dvc.lock`` (DVC
    cache, kept metrics), so the workspace keeps the last good state. A user error (the stage's
    exit 2, reported through ``$POSTTRAIN_ERROR_FILE`` because ``dvc repro`` itself exits 255)
    raises :class:`StageUserError` and is not retried.
    """
    logger = get_run_logger()
    repo = Path(repo_dir)
    if not force and not changed_stages(repo, [stage]):
        logger.info("stage %s is up to date: skipped", stage)
        return "skipped"
    cmd = [sys.executable, "-c", DVC_MAIN, "repro", "--single-item", stage] + (["--force"] if force else [])
    keep_uncached_outputs(stage, repo)  # the metrics DVC is about to delete, in case the stage fails
    fd, error_file = tempfile.mkstemp(prefix="posttrain-error-", suffix=".txt")
    os.close(fd)
    env = stage_env(parent_run_id)
    env[ERROR_FILE_ENV] = error_file
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            restored = exited_2 = False
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                restored |= "is cached - skipping run" in line
                exited_2 |= line.startswith("ERROR: failed to reproduce") and line.rstrip().endswith(
                    f"exited with {USER_ERROR_EXIT}"
                )
            proc.wait()
        finally:  # interrupted (Ctrl-C, an error here): stop dvc, and with it the stage
            _stop(proc)
        if proc.returncode:
            from tasks.stage import restore_last_good

            put_back = restore_last_good(stage, repo)
            if put_back:
                logger.info("stage %s: restored the last good %s", stage, ", ".join(put_back))
            message = Path(error_file).read_text().strip()
            if not message and exited_2:  # a command that is not a posttrain stage, e.g. a usage error
                message = f"its command exited with {USER_ERROR_EXIT} (bad input; its output is above)"
            if message:
                raise StageUserError(stage, message)
            raise StageFailed(stage, proc.returncode)
    finally:
        Path(error_file).unlink(missing_ok=True)
    outcome = "restored" if restored else "ran"
    logger.info("stage %s %s in %.1fs", stage, outcome, time.monotonic() - started)
    return outcome


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@task(task_run_name="promote")
def promote_candidate(repo_dir: str, parent_run_id: str | None) -> dict[str, Any] | None:
    """Run ``python -m tasks.promote`` (register the candidate, champion/challenger gate).

    Not retried: it is idempotent and keyed by the candidate's content hash, so the next run
    repairs whatever a failed one left. Returns the decision, or None when nothing is registered.
    """
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.promote"],
        cwd=repo_dir,
        env=stage_env(parent_run_id),
        capture_output=True,
        text=True,
    )
    sys.stdout.write("\n".join(line for line in proc.stdout.splitlines() if not line.startswith("{")) + "\n")
    sys.stderr.write(proc.stderr[-4000:] if proc.returncode else "")
    if proc.returncode:
        raise StageFailed("promote", proc.returncode)
    decisions = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return decisions[-1] if decisions else None


def _open_parent_run(repo: Path) -> tuple[Any, str]:
    import mlflow

    from tasks.tracking import configure, mark_dead_runs, owner_tags

    params = load_params(repo / "params.yaml")
    experiment_id = configure(params.tracking, root=repo)
    for run_id in mark_dead_runs(experiment_id):  # runs whose process was killed: KILLED, not RUNNING
        print(f"post-training: marked MLflow run {run_id} KILLED (its process died)")
    run = mlflow.start_run(experiment_id=experiment_id, run_name="post-training", tags=owner_tags())
    return mlflow, run.info.run_id


@flow(name="post-training", log_prints=True)
def post_training(
    repo_dir: str = ".", stages: list[str] | None = None, force: bool = False, track: bool = True
) -> dict[str, str]:
    """Run the DAG (or the named stages, in DAG order), then the champion/challenger gate.

    Returns ``{stage: ran|restored|skipped}`` plus ``promote: promoted|not promoted`` when the
    gate ran (whenever ``evaluate`` is selected and ``tracking.log_models`` is not ``none``).
    """
    _quiet_user_errors()
    repo = Path(repo_dir).resolve()
    load_params(repo / "params.yaml")  # fail fast, with the dotted key, before anything runs
    order = topological_order(load_stages(repo))
    unknown = sorted(set(stages or ()) - set(order))
    if unknown:
        raise PosttrainError(f"unknown stage {unknown[0]!r} (stages: {', '.join(order)})")
    selected = [s for s in order if not stages or s in stages]
    mlflow, parent_id = _open_parent_run(repo) if track else (None, None)
    outcomes: dict[str, str] = {}
    decision: dict[str, Any] | None = None
    status = "FAILED"
    try:
        for stage in selected:
            outcomes[stage] = run_stage(stage, str(repo), parent_id, force)
        if "evaluate" in selected:  # the registry follows the lineage, also when nothing re-ran
            decision = promote_candidate(str(repo), parent_id)
            if decision is not None:
                outcomes["promote"] = "promoted" if decision["promoted"] else "not promoted"
        status = "FINISHED"
    finally:
        if mlflow is not None:
            from flows.run_summary import log_pipeline_summary

            try:  # what the parent run shows in MLflow's Compare view and in `posttrain runs`
                log_pipeline_summary(repo, decision)
            except Exception as exc:  # noqa: BLE001 - a summary must never mask the run's own outcome
                print(f"post-training: could not log the run summary: {exc}", file=sys.stderr)
            mlflow.set_tags({f"posttrain.stage.{s}": o for s, o in outcomes.items()})
            mlflow.set_tag(
                "posttrain.stages_ran",
                ",".join(s for s, o in outcomes.items() if o == "ran" and s != "promote") or "none",
            )
            mlflow.end_run(status=status)
    summary = ", ".join(f"{s}: {o}" for s, o in outcomes.items())
    print(f"post-training: {summary}")
    return outcomes
