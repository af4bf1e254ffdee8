"""MLflow implementation of :class:`components.tracking.Tracker`, and the per-stage run.

Nesting across processes: ``posttrain run`` opens a parent run and exports its id in
``POSTTRAIN_PARENT_RUN_ID``; each stage subprocess (launched by ``dvc repro``) opens its run
with that parent. A stage run by plain ``dvc repro`` finds no parent and opens a top-level run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from components.params import TrackingConfig

PARENT_RUN_ENV = "POSTTRAIN_PARENT_RUN_ID"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


def resolve_tracking_uri(uri: str, root: Path) -> str:
    """Make a relative ``sqlite:///file.db`` absolute under ``root`` (the project root)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + str((root / uri[len(prefix) :]).resolve())
    return uri


def configure(cfg: TrackingConfig, root: Path | str = ".") -> str:
    """Point MLflow at the configured store and return the experiment id.

    Relative paths resolve against ``root``. The experiment is created with an explicit
    artifact location so artifacts never land in a CWD-relative ``mlruns/`` (MLflow's default
    with an sqlite store).
    """
    root = Path(root)
    mlflow.set_tracking_uri(resolve_tracking_uri(cfg.tracking_uri, root))
    client = MlflowClient()
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    location: str | None = cfg.artifact_root
    if cfg.tracking_uri.startswith(("http://", "https://")):
        location = None  # a tracking server stores (proxies) artifacts itself: --artifacts-destination
    elif "://" not in location:
        location = (root / location).resolve().as_uri()
    try:
        # MLflow 3 opens an experiment on its GenAI (traces) view unless told it holds training runs
        return client.create_experiment(
            cfg.experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: "custom_model_development"}
        )
    except mlflow.exceptions.MlflowException:  # created concurrently
        return client.get_experiment_by_name(cfg.experiment).experiment_id


class MlflowTracker:
    """Logs into the active MLflow run."""

    def log_params(self, params: dict[str, Any]) -> None:
        clean = {k: (str(v)[:500] if v is not None else "") for k, v in params.items()}
        mlflow.log_params(clean)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_model(self, model_dir: Path | str, name: str, registered_name: str | None = None) -> None:
        """Log a saved causal LM with MLflow's transformers flavor (and register it under a name).

        The flavor is given the loaded model and tokenizer (MLflow 3.17 cannot read a transformers-5
        checkpoint path) and pinned requirements (its inference imports torchvision, absent here).
        """
        from components.artifacts import library_versions
        from components.models.loading import load_causal_lm, load_tokenizer

        versions = library_versions()
        requirements = [f"{lib}=={versions[lib]}" for lib in ("torch", "transformers") if lib in versions]
        mlflow.transformers.log_model(
            transformers_model={"model": load_causal_lm(model_dir), "tokenizer": load_tokenizer(model_dir)},
            name=name,
            task="text-generation",
            registered_model_name=registered_name,
            pip_requirements=requirements,
        )

    def set_tags(self, tags: dict[str, str]) -> None:
        mlflow.set_tags(tags)


@contextmanager
def stage_run(stage: str, cfg: TrackingConfig) -> Iterator[MlflowTracker]:
    """Open the stage's MLflow run: nested under ``$POSTTRAIN_PARENT_RUN_ID`` when the flow set it."""
    experiment_id = configure(cfg)
    parent = os.environ.get(PARENT_RUN_ENV) or None
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, parent_run_id=parent):
        mlflow.set_tags({"posttrain.stage": stage})
        yield MlflowTracker()


PID_TAG = "posttrain.pid"
HOST_TAG = "posttrain.host"


def owner_tags() -> dict[str, str]:
    """Tags naming the process that owns a run, so a later run can tell when it died (see below)."""
    import socket

    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def mark_dead_runs(experiment_id: str, status: str = "KILLED") -> list[str]:
    """End the RUNNING runs of this experiment whose owner process (``owner_tags``) died on this host.

    A process killed with SIGKILL (or by the OOM killer, or a power cut) cannot end its run, which
    would otherwise stay RUNNING forever. Runs of other hosts, runs without owner tags and runs
    whose pid is alive (possibly reused: then the run is left as is) are not touched. Returns the
    ids of the runs it ended.
    """
    import socket

    from components.artifacts import pid_alive

    client = MlflowClient()
    host = socket.gethostname().replace("'", "")
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
        max_results=1000,
    )
    ended = []
    for run in runs:
        pid = run.data.tags.get(PID_TAG, "")
        if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
            continue
        client.set_tag(run.info.run_id, "posttrain.end_reason", f"process {pid} on {host} died")
        client.set_terminated(run.info.run_id, status=status)
        ended.append(run.info.run_id)
    return ended


LOGGED_MODEL_TAG = "posttrain.logged_model_sha256"


def log_model_once(tracker: Any, model_dir: Path | str, name: str, content_hash: str) -> str | None:
    """Log a model unless a run of this experiment already logged the same bytes; that run's id, if so.

    A base model is hundreds of MB for a real LLM: logging it on every re-run of ``base`` (a
    forced run, a changed key that leaves the weights alike) would fill the artifact store.
    """
    if not isinstance(tracker, MlflowTracker):
        tracker.log_model(model_dir, name=name)
        return None
    active = mlflow.active_run()
    found = MlflowClient().search_runs(
        [active.info.experiment_id],
        filter_string=f"tags.`{LOGGED_MODEL_TAG}` = '{content_hash}'",
        max_results=1,
    )
    if found:
        mlflow.set_tags({"posttrain.model_logged_in_run": found[0].info.run_id})
        return found[0].info.run_id
    tracker.log_model(model_dir, name=name)
    mlflow.set_tags({LOGGED_MODEL_TAG: content_hash})
    return None


def lineage_tags(repo: Path | str = ".") -> dict[str, str]:
    """The git commit and the ``dvc.lock`` hash that pin what a run or a registered version came from."""
    import hashlib

    from components.artifacts import code_version

    lock = Path(repo) / "dvc.lock"
    return {
        "posttrain.git_commit": code_version(),
        "posttrain.dvc_lock_sha256": hashlib.sha256(lock.read_bytes()).hexdigest()
        if lock.is_file()
        else "none",
    }
