"""Compute settings: resolve ``compute.device``/``compute.precision``, and run DDP across processes.

:func:`resolve_compute` turns the ``compute`` section into a concrete ``(device, precision)``
once per process. With ``compute.processes > 1`` a training stage re-executes itself under
``accelerate launch`` (:func:`launch`); every worker runs the same ``python -m tasks.<stage>``
and the Hugging Face trainers pick the DDP backend themselves (gloo with ``use_cpu``, nccl on
CUDA). Only rank 0 writes outputs, metrics and MLflow runs; the rank helpers read the
launcher's environment (``RANK``, ``WORLD_SIZE``), so they work before ``torch.distributed`` is
initialised and cost nothing in a plain single-process run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from components.config import ConfigError
from components.params import ComputeConfig

# Stages that train with a Hugging Face trainer; the others ignore ``compute.processes``.
TRAINING_STAGES = frozenset({"base", "sft", "reward_model", "align"})

# Set by :func:`launch` for its workers: a folder where a worker leaves its user-error message,
# and the marker that a process is a launched worker (so it never launches again).
STATUS_ENV = "POSTTRAIN_LAUNCH_STATUS"


def resolve_compute(
    cfg: ComputeConfig,
    *,
    cuda_available: bool | None = None,
    bf16_supported: bool | None = None,
) -> tuple[str, str]:
    """``(device, precision)``: ``cpu``/``cuda``, and ``fp32``/``bf16``/``fp16``.

    ``precision: auto`` is bf16 on a CUDA GPU that supports it, else fp32, and fp32 on CPU.
    The precision is always explicit: TRL's SFT/DPO/Reward configs default to ``bf16=True``,
    which on CPU silently meant bf16 autocast for three stages and fp32 for base pretraining.
    bf16 on CPU is autocast with fp32 weights (verified to train); fp16 on CPU is refused.
    ``cuda_available``/``bf16_supported`` default to what torch reports (tests pass them).
    """
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    device = cfg.device
    if device == "auto":
        device = "cuda" if cuda_available else "cpu"
    elif device == "cuda" and not cuda_available:
        raise ConfigError("compute.device: 'cuda', but torch.cuda.is_available() is False (use auto or cpu)")
    if device == "cuda" and bf16_supported is None:
        import torch

        bf16_supported = torch.cuda.is_bf16_supported()
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device == "cuda" and bf16_supported else "fp32"
    if precision == "bf16" and device == "cuda" and not bf16_supported:
        raise ConfigError("compute.precision: 'bf16', but this GPU does not support bf16 (use fp16 or fp32)")
    if precision == "fp16" and device == "cpu":
        raise ConfigError("compute.precision: 'fp16' needs compute.device cuda; on CPU use fp32 or bf16")
    return device, precision


def rank() -> int:
    """This process's global rank under a launcher (0 outside one)."""
    return int(os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE") or 1)


def is_main_process() -> bool:
    """Rank 0 (or no launcher): the one process that writes outputs, metrics and MLflow runs."""
    return rank() == 0


def is_launched_worker() -> bool:
    """True inside ``accelerate launch``/``torchrun`` workers, and in anything :func:`launch` started."""
    return any(key in os.environ for key in ("RANK", "LOCAL_RANK", STATUS_ENV))


def launch_command(module: str, processes: int) -> list[str]:
    """``accelerate launch`` running ``python -m <module>`` in ``processes`` local workers.

    ``--multi_gpu`` selects accelerate's torch.distributed launcher, on CPU too: with ``--cpu``,
    accelerate 1.15 starts a single process unless ``mpirun`` is configured. The device is the
    trainer's choice (``use_cpu`` from :func:`resolve_compute`), and with it the backend.
    ``--mixed_precision no``: the launcher's value becomes ``ACCELERATE_MIXED_PRECISION``, which
    ``TrainingArguments`` adopts unless its own ``bf16``/``fp16`` is set, so anything else would
    turn on mixed precision for a trainer that asked for fp32. The trainers' flags decide.
    """
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",  # a free port, so two launches on one machine do not collide
        "-m",
        module,
    ]


def launch(module: str, cfg: ComputeConfig) -> tuple[int, str | None]:
    """Run ``module`` in ``cfg.processes`` workers; the exit code, and a worker's user error if any.

    A worker that fails with a :class:`~components.errors.PosttrainError` leaves its message
    in the status folder (:func:`report_worker_error`): the launcher itself only says that a
    child failed, so the caller prints that message once and exits 2, as a single process would.
    """
    device, _ = resolve_compute(cfg)
    if device == "cuda":
        import torch

        if torch.cuda.device_count() < cfg.processes:
            raise ConfigError(
                f"compute.processes: {cfg.processes} processes on cuda need as many GPUs, "
                f"found {torch.cuda.device_count()}"
            )
    env = dict(os.environ)
    if device == "cpu":  # share the thread budget between the workers instead of oversubscribing
        threads = int(env.get("OMP_NUM_THREADS") or 2)
        env["OMP_NUM_THREADS"] = str(max(1, threads // cfg.processes))
    with tempfile.TemporaryDirectory(prefix="posttrain-launch-") as status:
        env[STATUS_ENV] = status
        code = subprocess.run(launch_command(module, cfg.processes), env=env).returncode
        errors = sorted(Path(status).glob("rank-*.error"), key=lambda p: int(p.stem.split("-")[1]))
        message = errors[0].read_text() if errors else None
    return code, message


def report_worker_error(message: str) -> bool:
    """In a worker started by :func:`launch`, record a user error for the parent; False elsewhere."""
    status = os.environ.get(STATUS_ENV)
    if not status or not Path(status).is_dir():
        return False
    (Path(status) / f"rank-{rank()}.error").write_text(message)
    return True
