"""What every stage command shares: params, threads, the MLflow run, metrics, one-line errors.

Each ``tasks/<stage>.py`` defines ``run(params, tracker) -> metrics`` and ends with
``main = stage_command("<stage>", run)``; ``python -m tasks.<stage>`` is the command that
``dvc.yaml`` runs. Metrics go to ``metrics/<stage>.json`` (atomically) and to MLflow.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from components.artifacts import (
    code_version,
    keep_uncached_outputs,
    restore_missing_outputs,
    write_json_atomic,
)
from components.config import flatten, to_dict
from components.distributed import (
    TRAINING_STAGES,
    is_launched_worker,
    is_main_process,
    launch,
    report_worker_error,
    resolve_compute,
)
from components.errors import PosttrainError
from components.params import Params, load_params
from components.tracking import RecordingTracker, Tracker

StageFn = Callable[[Params, Tracker], dict[str, Any]]

# The ``paths`` key of each stage's output directory.
OUTPUT_PATHS = {
    "base": "base_model",
    "ingest": "processed",
    "sft": "sft_model",
    "preferences": "preferences",
    "reward_model": "reward_model",
    "align": "aligned_model",
    "compress": "compressed_model",
    "evaluate": "evaluation",
    "rag_index": "rag",
}


def configure_threads() -> None:
    """Use the cores we were given, deliberately: ``OMP_NUM_THREADS`` or 2 (the CPU budget)."""
    import torch

    threads = int(os.environ.get("OMP_NUM_THREADS", "2") or 2)
    torch.set_num_threads(threads)


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric leaves of a (nested) metrics dict, with dotted keys, for MLflow."""
    return {
        k: float(v)
        for k, v in flatten(metrics).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def run_stage(name: str, fn: StageFn, params_path: str = "params.yaml") -> dict[str, Any]:
    """Run one stage inside its MLflow run and write ``metrics/<name>.json``.

    A DDP worker other than rank 0 runs the stage with an in-memory tracker and writes nothing:
    the output, ``metrics/<name>.json`` and the one MLflow run come from rank 0.
    """
    from tasks.tracking import configure, mark_dead_runs, owner_tags, stage_run

    params = load_params(params_path)
    configure_threads()
    section = getattr(params, name)
    training = name in TRAINING_STAGES
    if training:  # an impossible device/precision fails here, before a run is opened
        device, precision = resolve_compute(params.compute)
    if not is_main_process():
        return fn(params, RecordingTracker())
    try:  # a run whose process was killed earlier stays RUNNING unless someone ends it
        mark_dead_runs(configure(params.tracking))
    except Exception as exc:  # noqa: BLE001 - housekeeping must not fail the stage
        print(f"posttrain {name}: warning: could not check for dead MLflow runs: {exc}", file=sys.stderr)
    with stage_run(name, params.tracking) as tracker:
        tracker.set_tags({"posttrain.code_version": code_version(), **owner_tags()})
        tracker.log_params(flatten(to_dict(section), prefix=f"{name}."))
        if training:
            tracker.log_params(flatten(to_dict(params.compute), prefix="compute."))
            tracker.set_tags({"posttrain.device": device, "posttrain.precision": precision})
        metrics = fn(params, tracker)
        metrics_path = Path(params.paths.metrics) / f"{name}.json"
        write_json_atomic(metrics_path, metrics)
        tracker.log_metrics(numeric_metrics(metrics))
        tracker.log_artifact(metrics_path)
        if name in OUTPUT_PATHS:  # the output's self-description: resolved config and manifest
            out_dir = Path(getattr(params.paths, OUTPUT_PATHS[name]))
            for file in ("config.yaml", "manifest.json"):
                if (out_dir / file).is_file():
                    tracker.log_artifact(out_dir / file, artifact_path="output")
    return metrics


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


ERROR_FILE_ENV = "POSTTRAIN_ERROR_FILE"  # set by the flow: where a stage writes its one-line user error
DVC_STAGE_ENV = "DVC_STAGE"  # set by ``dvc repro`` for every command it runs


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``).

    Without it, killing ``dvc repro`` (or the flow above it) leaves the stage training on as an
    orphan. Survives ``exec``. Returns False where the call is not available (not Linux).
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, int(sig), 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


def _orphaned() -> bool:
    """Whether the ``dvc repro`` that started this stage died before :func:`die_with_parent` ran.

    Importing a training stage takes seconds (torch, transformers): a parent killed meanwhile
    sends no signal, and this process was re-parented to init or a subreaper, whose command line
    names neither DVC nor a stage (the shell DVC may run us through names the stage).
    """
    try:
        cmdline = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return False
    return b"dvc" not in cmdline and b"tasks." not in cmdline


def dvc_cache_dir(root: Path | str = ".") -> Path | None:
    """The DVC 3 cache directory of the project (``cache.dir`` honoured), or None outside DVC."""
    try:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            return Path(repo.cache.local.path)
    except Exception:  # noqa: BLE001 - not a DVC repo, or an unreadable config: the default place
        return None


def restore_last_good(stage: str, root: Path | str = ".") -> list[str]:
    """Put back the outputs of ``stage`` that ``dvc repro`` deleted and the failed command did not write."""
    return restore_missing_outputs(stage, root, dvc_cache_dir(root))


def _report_user_error(message: str) -> None:
    """Hand the one-line message to the flow (``$POSTTRAIN_ERROR_FILE``): it shows it, does not retry."""
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        try:
            Path(path).write_text(message.replace("\n", " ") + "\n")
        except OSError:
            pass


def _under_dvc_main() -> str | None:
    """The DVC stage this process runs as (``$DVC_STAGE``), when it is the stage's top process."""
    if is_launched_worker():
        return None
    return os.environ.get(DVC_STAGE_ENV) or None


def stage_command(name: str, fn: StageFn) -> Callable[[], None]:
    """The ``main()`` of ``python -m tasks.<name>``: user errors become one line and exit code 2.

    A training stage with ``compute.processes > 1`` re-executes itself under ``accelerate
    launch`` (unless it already is a launched worker) and exits with the launcher's code; a
    worker's user error still comes back as its one line and exit code 2.
    """

    def main() -> None:
        dvc_stage = _under_dvc_main()
        # SIGTERM (from the launcher, a parent that died, or kill) unwinds: the MLflow run ends
        # FAILED and, under dvc repro, the last good outputs are put back.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            if os.environ.get(DVC_STAGE_ENV) and die_with_parent() and _orphaned():
                print(f"posttrain {name}: dvc repro is gone: not running", file=sys.stderr)
                raise SystemExit(128 + signal.SIGTERM)
            _main()
        except BaseException as exc:
            if dvc_stage is not None:
                ok = isinstance(exc, SystemExit) and exc.code in (0, None)
                _after_dvc_stage(dvc_stage, failed=not ok)
            raise
        if dvc_stage is not None:
            _after_dvc_stage(dvc_stage, failed=False)

    def _after_dvc_stage(dvc_stage: str, failed: bool) -> None:
        """Success: keep the uncached outputs (metrics, plots); failure: put back what dvc deleted."""
        root = os.environ.get("DVC_ROOT", ".")
        try:
            if not failed:
                keep_uncached_outputs(dvc_stage, root)
            elif restored := restore_last_good(dvc_stage, root):
                print(f"posttrain {name}: restored the last good {', '.join(restored)}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - never hide the stage's own result behind this
            print(f"posttrain {name}: warning: could not keep/restore outputs: {exc}", file=sys.stderr)

    def _main() -> None:
        try:
            if name in TRAINING_STAGES and not is_launched_worker():
                compute = load_params().compute
                if compute.processes > 1:
                    code, error = launch(f"tasks.{name}", compute)
                    if error is not None:
                        raise PosttrainError(error)
                    sys.exit(code)
            metrics = run_stage(name, fn)
        except PosttrainError as exc:
            if not report_worker_error(str(exc)):  # a launched worker leaves the message to its parent
                print(f"posttrain {name}: error: {exc}", file=sys.stderr)
                _report_user_error(str(exc))
            sys.exit(2)
        if not is_main_process():
            return
        summary = ", ".join(f"{k}={v:.4g}" for k, v in list(numeric_metrics(metrics).items())[:8])
        print(f"posttrain {name}: done ({summary})")

    return main
