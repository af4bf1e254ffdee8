"""Bridge from Hugging Face trainers to our :class:`~components.tracking.Tracker`.

Trainers run with ``report_to=[]``; this callback forwards every log line to the tracker with
its global step (MLflow charts) and keeps the history, which stages write as DVC plots.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, set_seed

from components.charts import loss_chart
from components.distributed import is_main_process, resolve_compute
from components.params import ComputeConfig
from components.tracking import Tracker

# The trainer's one-off end-of-training line: single points that clutter MLflow's charts
# (``train_loss``, the run's mean loss, is kept: it is the one summary worth comparing).
SUMMARY_KEYS = frozenset(
    {"total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second"}
)


class TrackerCallback(TrainerCallback):
    """Forward ``on_log`` metrics to a tracker under ``prefix`` and remember them."""

    def __init__(self, tracker: Tracker, prefix: str = "", step_offset: int = 0) -> None:
        self.tracker = tracker
        self.prefix = prefix
        self.step_offset = step_offset  # steps of earlier trainers in the same stage (DPO rounds)
        self.history: list[dict[str, float]] = []

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - HF signature
        # The trainer's own view: how many DDP processes share each optimizer step, in what precision.
        mixed = "fp16" if args.fp16 else "bf16" if args.bf16 else "no"
        self.tracker.set_tags(
            {"posttrain.world_size": str(args.world_size), "posttrain.mixed_precision": mixed}
        )

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 - HF signature
        numeric = {
            k: float(v)
            for k, v in (logs or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if not numeric:
            return
        curves = {f"{self.prefix}{k}": v for k, v in numeric.items() if k not in SUMMARY_KEYS}
        step = state.global_step + self.step_offset
        if curves:
            self.tracker.log_metrics(curves, step=step)
        self.history.append({"step": float(step), **numeric})


def logging_steps(n_examples: int, batch_size: int, epochs: int, points: int = 20) -> int:
    """Log about ``points`` times per run (every 10 steps at most), so short runs still get curves."""
    steps = max(1, -(-n_examples // batch_size) * epochs)
    return max(1, min(10, steps // points))


def trainer_args(
    work_dir: Path,
    *,
    seed: int,
    learning_rate: float,
    epochs: int,
    batch_size: int,
    n_examples: int,
    has_eval: bool,
    compute: ComputeConfig | None = None,
    resumable: bool = False,
) -> dict[str, Any]:
    """The ``TrainingArguments`` every stage shares: seeded, no checkpoints, our own logging.

    ``compute`` (``params.compute``; defaults when omitted) picks the device and the mixed
    precision through :func:`~components.distributed.resolve_compute`, always explicitly (TRL's
    configs would otherwise default to bf16, also on CPU). ``set_seed`` is
    called here too, before the trainer builds anything random (a reward head, LoRA matrices),
    so a stage gives the same weights on every run.

    ``resumable``: ``work_dir`` is a checkpoint directory
    (:func:`components.training.checkpoints.checkpoint_dir`) and a full checkpoint (weights,
    optimizer, scheduler, RNG) is written there every ``compute.checkpoint_steps`` steps, the
    newest one kept.
    """
    compute = compute or ComputeConfig()
    device, precision = resolve_compute(compute)
    set_seed(seed)
    return {
        "output_dir": str(work_dir),
        "learning_rate": learning_rate,
        "num_train_epochs": epochs,
        "per_device_train_batch_size": batch_size,
        "per_device_eval_batch_size": batch_size,
        "logging_steps": logging_steps(n_examples, batch_size, epochs),
        "eval_strategy": "epoch" if has_eval else "no",
        "save_strategy": "steps" if resumable and compute.checkpoint_steps else "no",
        "save_steps": compute.checkpoint_steps or 500,
        "save_total_limit": 1,
        "report_to": [],
        "seed": seed,
        "data_seed": seed,
        "use_cpu": device == "cpu",
        "dataloader_num_workers": 0,
        # explicit: TRL's configs default to activation checkpointing, which recomputes every layer
        # in backward (~25% of a CPU step) to save memory that only big models on a GPU need
        "gradient_checkpointing": compute.gradient_checkpointing,
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
    }


def final_values(history: list[dict[str, float]], keys: tuple[str, ...]) -> dict[str, float]:
    """The last logged value of each key (e.g. the final ``loss`` and ``eval_loss``)."""
    out: dict[str, float] = {}
    for row in history:
        out.update({k: row[k] for k in keys if k in row})
    return out


def write_history_plots(
    plots_dir: Path | str,
    stage: str,
    history: Sequence[dict[str, float]],
    columns: Sequence[str],
    tracker: Tracker | None = None,
) -> list[Path]:
    """Write a trainer history as ``dvc plots`` CSVs and one PNG; the files written.

    One CSV per column, ``<stage>_<column>.csv`` (``step,<column>``, only the steps that logged
    it: ``loss`` per logging step, ``eval_loss`` per epoch; a shared CSV would leave empty
    cells that DVC's vega charts draw as zeros), and ``<stage>_loss.png`` with every column on
    one chart (:func:`components.charts.loss_chart`), which is also logged to ``tracker``
    under ``plots/``. Only rank 0 writes (every DDP rank holds the same, averaged, history).
    """
    if not is_main_process():
        return []
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for column in columns:
        path = plots_dir / f"{stage}_{column}.csv"
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["step", column])
            writer.writerows([int(row["step"]), row[column]] for row in history if column in row)
        tmp.replace(path)
        written.append(path)
    png = loss_chart(plots_dir / f"{stage}_loss.png", history, columns, title=f"{stage} loss")
    if tracker is not None:
        tracker.log_artifact(png, artifact_path="plots")
    return [*written, png]
