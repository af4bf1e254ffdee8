"""``compute`` on a CUDA machine: auto picks cuda (bf16 where supported) and the tiny SFT trains there.

Skipped without CUDA (``tests/conftest.py`` skips every ``gpu`` test).
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from components.distributed import resolve_compute
from components.params import ComputeConfig, load_params
from components.tracking import RecordingTracker

pytestmark = pytest.mark.gpu


def test_auto_resolves_to_cuda_with_bf16_where_supported() -> None:
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    assert resolve_compute(ComputeConfig()) == ("cuda", expected)
    assert resolve_compute(ComputeConfig(device="cpu")) == ("cpu", "fp32")
    assert resolve_compute(ComputeConfig(precision="fp16")) == ("cuda", "fp16")


def test_trainer_arguments_place_training_on_cuda(tmp_path: Path) -> None:
    from transformers import TrainingArguments

    from components.training.callbacks import trainer_args

    kw = dict(seed=0, learning_rate=1e-3, epochs=1, batch_size=8, n_examples=8, has_eval=False)
    args = trainer_args(tmp_path, compute=ComputeConfig(), **kw)
    assert args["use_cpu"] is False
    assert args["bf16"] is torch.cuda.is_bf16_supported() and args["fp16"] is False
    assert TrainingArguments(**args).device.type == "cuda"
    on_cpu = TrainingArguments(**trainer_args(tmp_path, compute=ComputeConfig(device="cpu"), **kw))
    assert on_cpu.device.type == "cpu"  # device: cpu is honoured on a GPU machine


def test_one_sft_step_on_cuda_moves_the_adapter(
    tiny_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import components.training.sft as sft_module
    from components.data.jsonl import read_jsonl

    for stage in ("base", "ingest"):  # on CPU (the tiny params pin compute.device: cpu)
        importlib.import_module(f"tasks.{stage}").run(load_params("params.yaml"), RecordingTracker())

    seen: dict[str, object] = {}

    class RecordingSFTTrainer(sft_module.SFTTrainer):
        def train(self, *args, **kwargs):  # noqa: ANN002, ANN003
            result = super().train(*args, **kwargs)
            seen["device"] = next(self.model.parameters()).device.type
            seen["bf16"] = self.args.bf16
            seen["steps"] = self.state.global_step
            return result

    monkeypatch.setattr(sft_module, "SFTTrainer", RecordingSFTTrainer)
    params = load_params("params.yaml")
    # One optimizer step at the peak learning rate (warmup would make the first step's lr 0).
    cfg = dataclasses.replace(params.sft, epochs=1, batch_size=16, warmup_steps=0)
    train = read_jsonl(tiny_project / "data/processed/sft_train.jsonl")[:16]
    out = tmp_path / "sft"
    out.mkdir()
    tracker = RecordingTracker()
    history, _ = sft_module.train_sft(
        cfg, tiny_project / "models/base", train, [], out, tracker, tmp_path / "work", ComputeConfig()
    )

    assert seen == {"device": "cuda", "bf16": torch.cuda.is_bf16_supported(), "steps": 1}
    assert tracker.tags["posttrain.world_size"] == "1"
    losses = [h["train_loss"] for h in history if "train_loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    weights = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(torch.count_nonzero(v) > 0 for v in lora_b), "LoRA B starts at 0; one step moves it"
