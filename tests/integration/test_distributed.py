"""``compute``: device/precision reach the trainers, and ``processes: 2`` trains one stage with DDP.

The fast tests pin the pieces (trainer arguments, the launch command, rank-0-only writes); the
slow ones run ``python -m tasks.sft`` as a subprocess on the tiny project with
``compute.processes: 2``: it re-executes itself under ``accelerate launch``, two CPU workers
train with gloo, and rank 0 alone writes the adapter, the metrics and the one MLflow run.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from components.distributed import TRAINING_STAGES, launch_command
from components.params import ComputeConfig, load_params
from components.tracking import RecordingTracker

LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def rank1(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process poses as the second worker of two."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")


@pytest.mark.parametrize(("precision", "bf16"), [("auto", False), ("fp32", False), ("bf16", True)])
def test_cpu_precision_is_explicit_for_trl_configs_too(tmp_path: Path, precision: str, bf16: bool) -> None:
    from transformers import TrainingArguments
    from trl import SFTConfig as TRLSFTConfig

    from components.training.callbacks import trainer_args

    kw = dict(seed=0, learning_rate=1e-3, epochs=1, batch_size=8, n_examples=8, has_eval=False)
    args = trainer_args(tmp_path, compute=ComputeConfig(device="cpu", precision=precision), **kw)
    assert (args["use_cpu"], args["bf16"], args["fp16"]) == (True, bf16, False)
    for config in (TRLSFTConfig(**args), TrainingArguments(**args)):
        assert (config.bf16, config.fp16, config.device.type) == (bf16, False, "cpu")
    # left out, TRL would turn bf16 on by itself: the arguments must always say
    without = {k: v for k, v in args.items() if k not in ("bf16", "fp16")}
    assert TRLSFTConfig(**without).bf16 is True


def test_launch_command_runs_the_same_module_in_n_torch_distributed_workers() -> None:
    cmd = launch_command("tasks.sft", 2)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[-2:] == ["-m", "tasks.sft"]
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    # the launcher's value would override a trainer's own fp32: the trainers' bf16/fp16 decide
    assert cmd[cmd.index("--mixed_precision") + 1] == "no"
    # accelerate 1.15 with --cpu starts one process (multi-CPU needs mpirun): --multi_gpu selects
    # torch.distributed.run, and the trainer's use_cpu picks gloo.
    assert "--multi_gpu" in cmd and "--cpu" not in cmd
    assert TRAINING_STAGES == {"base", "sft", "reward_model", "align"}


def test_atomic_dir_on_a_non_zero_rank_writes_nothing(tmp_path: Path, rank1: None) -> None:
    from components.artifacts import atomic_dir

    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "weights.bin").write_text("rank 1")
        assert tmp.parent == tmp_path and tmp.is_dir()
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # the scratch dir is gone


def test_atomic_dir_on_a_non_zero_rank_keeps_rank_0s_output(tmp_path: Path, rank1: None) -> None:
    from components.artifacts import atomic_dir

    target = tmp_path / "out"
    target.mkdir()
    (target / "weights.bin").write_text("rank 0")
    with atomic_dir(target) as tmp:
        (tmp / "weights.bin").write_text("rank 1")
    assert (target / "weights.bin").read_text() == "rank 0"


def test_history_plots_are_written_by_rank_0_only(tmp_path: Path, rank1: None) -> None:
    from components.training.callbacks import write_history_plots

    assert write_history_plots(tmp_path, "sft", [{"step": 1.0, "loss": 2.0}], ["loss"]) == []
    assert not list(tmp_path.iterdir())


def test_run_stage_on_a_non_zero_rank_opens_no_run_and_writes_no_metrics(
    tiny_project: Path, rank1: None
) -> None:
    from tasks.stage import run_stage

    seen: list[object] = []

    def fake(params, tracker):  # noqa: ANN001
        seen.append(tracker)
        return {"final_loss": 1.0}

    assert run_stage("sft", fake) == {"final_loss": 1.0}
    assert isinstance(seen[0], RecordingTracker)
    assert not (tiny_project / "metrics").exists()
    assert not (tiny_project / "mlflow.db").exists()


# --------------------------------------------------------------------------- two real processes


def _set_processes(project: Path, n: int) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["compute"]["processes"] = n
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def _run_stage_command(project: Path, stage: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and k != "POSTTRAIN_PARENT_RUN_ID"}
    return subprocess.run(
        [sys.executable, "-m", f"tasks.{stage}"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _stage_runs(project: Path, stage: str) -> tuple:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`posttrain.stage` = '{stage}'")
    return client, runs


@pytest.mark.slow
def test_sft_trains_with_two_ddp_processes(tiny_project: Path) -> None:
    for stage in ("base", "ingest"):  # upstream outputs, in-process (single process)
        importlib.import_module(f"tasks.{stage}").run(load_params("params.yaml"), RecordingTracker())
    _set_processes(tiny_project, 2)

    proc = _run_stage_command(tiny_project, "sft")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("posttrain sft: done") == 1, proc.stdout[-2000:]  # rank 0 alone reports

    out = tiny_project / "models/sft"
    weights = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(torch.count_nonzero(v) > 0 for v in lora_b), (
        "LoRA B starts at zero; training moves it"
    )
    for parent in (tiny_project / "models", tiny_project / "plots", tiny_project / "metrics"):
        leftovers = [p.name for p in parent.iterdir() if ".tmp" in p.name or ".old-" in p.name]
        assert not leftovers, leftovers
    assert sorted(p.name for p in (tiny_project / "models").iterdir()) == ["base", "sft"]
    metrics = json.loads((tiny_project / "metrics/sft.json").read_text())
    assert metrics["final_loss"] < metrics["first_loss"]
    assert (tiny_project / "plots/sft_loss.csv").is_file()

    client, runs = _stage_runs(tiny_project, "sft")
    assert len(runs) == 1, "exactly one MLflow run: rank 0's"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["posttrain.world_size"] == "2"  # as the trainer saw it
    assert (run.data.tags["posttrain.device"], run.data.tags["posttrain.precision"]) == ("cpu", "fp32")
    assert run.data.tags["posttrain.mixed_precision"] == "no"  # fp32: TRL's bf16 default is overridden
    assert run.data.params["compute.processes"] == "2"
    # Both ranks took part: each optimizer step consumed batch_size examples on each of 2 ranks.
    cfg = load_params("params.yaml").sft
    steps = math.ceil(metrics["n_train"] / (cfg.batch_size * 2)) * cfg.epochs
    assert steps < math.ceil(metrics["n_train"] / cfg.batch_size) * cfg.epochs  # would be 20 with one
    final_step = [m.step for m in client.get_metric_history(run.info.run_id, "sft/train_loss")]
    assert final_step == [steps]
    assert client.get_metric_history(run.info.run_id, "sft/loss"), "loss was logged by step"


@pytest.mark.slow
def test_a_user_error_in_the_workers_exits_2_with_one_line(tiny_project: Path) -> None:
    _set_processes(tiny_project, 2)  # no models/base: every worker fails in require_dir
    proc = _run_stage_command(tiny_project, "sft")
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("posttrain sft: error:")]
    assert errors == [proc.stderr.strip().splitlines()[-1]]  # one line, printed last, by the parent
    assert "models/base" in errors[0] and "base model not found" in errors[0]
    assert not (tiny_project / "models/sft").exists()
    db = tiny_project / "mlflow.db"
    if db.exists():  # rank 0's run ended, did not dangle (read with sqlite3: rank 0 may have been
        # stopped while MLflow was still creating its tables, which MLflow's own client cannot open)
        import sqlite3

        with sqlite3.connect(db) as conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            statuses = [r[0] for r in conn.execute("SELECT status FROM runs")] if "runs" in tables else []
        assert "RUNNING" not in statuses
