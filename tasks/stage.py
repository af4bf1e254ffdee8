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

from components.artifacts import code_version, write_json_atomic
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
    from tasks.tracking import stage_run

    params = load_params(params_path)
    configure_threads()
    section = getattr(params, name)
    training = name in TRAINING_STAGES
    if training:  # an impossible device/precision fails here, before a run is opened
        device, precision = resolve_compute(params.compute)
    if not is_main_process():
        return fn(params, RecordingTracker())
    with stage_run(name, params.tracking) as tracker:
        tracker.set_tags({"posttrain.code_version": code_version()})
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


def stage_command(name: str, fn: StageFn) -> Callable[[], None]:
    """The ``main()`` of ``python -m tasks.<name>``: user errors become one line and exit code 2.

    A training stage with ``compute.processes > 1`` re-executes itself under ``accelerate
    launch`` (unless it already is a launched worker) and exits with the launcher's code; a
    worker's user error still comes back as its one line and exit code 2.
    """

    def main() -> None:
        if is_launched_worker():  # the launcher stops the other workers with SIGTERM when one fails:
            signal.signal(signal.SIGTERM, _exit_on_sigterm)  # unwind, so rank 0's MLflow run ends FAILED
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
            sys.exit(2)
        if not is_main_process():
            return
        summary = ", ".join(f"{k}={v:.4g}" for k, v in list(numeric_metrics(metrics).items())[:8])
        print(f"posttrain {name}: done ({summary})")

    return main
