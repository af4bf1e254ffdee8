"""The one place that keeps every process offline and quiet: no Hub fetches, no telemetry.

``components/__init__.py`` applies it on first import, so a stage command, the CLI, a test and
a benchmark all get the same environment before transformers, MLflow, Prefect or DVC read it.
Values are defaults (``setdefault``): a user may still opt in, e.g. ``HF_HUB_OFFLINE=0`` to
fetch a Hub model once. Thread counts are deliberate: 2 unless ``OMP_NUM_THREADS`` says otherwise.
"""

from __future__ import annotations

import logging
import os
import warnings

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
    # gRPC's C core logs to stderr by itself; on long Milvus Lite sessions that is a stream of
    # "GOAWAY ... too_many_pings" lines. pymilvus raises real RPC errors as exceptions anyway.
    "GRPC_VERBOSITY": "NONE",
}


# Known-harmless log lines, by logger: (logger name, message prefix). bitsandbytes looks for an
# optional Hub kernel on AVX512-BF16 CPUs and warns in every process that imports it; the
# fallback it then uses is its own C++ kernel, so nothing is missing.
KNOWN_NOISE: tuple[tuple[str, str], ...] = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
    # LLM.int8 on CPU casts every int8 linear's input to fp16: logged on each forward of each layer
    ("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast"),
)


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def apply_offline_env() -> None:
    """Set every key of :data:`OFFLINE_ENV` that the caller has not set, and mute :data:`KNOWN_NOISE`."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    # transformers 5 renamed gradient checkpointing to activation checkpointing; TRL 1.16 still
    # reads and calls the old names, so every trainer repeats these FutureWarnings (harmless).
    warnings.filterwarnings(
        "ignore", message=r"`(is_)?gradient_checkpointing\w*` is deprecated", category=FutureWarning
    )
    for name, prefix in KNOWN_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropPrefix(prefix))
