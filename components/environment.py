"""The one place that keeps every process offline and quiet: no Hub fetches, no telemetry.

``components/__init__.py`` applies it on first import, so a stage command, the CLI, a test and
a benchmark all get the same environment before transformers, MLflow, Prefect or DVC read it.
Values are defaults (``setdefault``): a user may still opt in, e.g. ``HF_HUB_OFFLINE=0`` to
fetch a Hub model once. Thread counts are deliberate: 2 unless ``OMP_NUM_THREADS`` says otherwise.
"""

from __future__ import annotations

import os

OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "UNSTRUCTURED_DISABLE_NOTICE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "2",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_TO_API_ENABLED": "false",
}


def apply_offline_env() -> None:
    """Set every key of :data:`OFFLINE_ENV` that the caller has not set."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
