"""``sft.padding_free``: the same training as padded batches, without the pad tokens.

Two SFT runs from the same tiny base and seed, one with padded batches and one padding-free
(TRL flattens each batch into one row; transformers builds a block-diagonal causal mask from
the restarting ``position_ids``). Checked: the padding-free run really fed flat, pad-free
batches; it logged the same losses step for step; and it ended at the same adapter weights.
A mask that let sequences attend across their boundaries, or a loss that counted pad
positions, would break the equality.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from components.data.jsonl import read_jsonl
from components.params import load_params
from components.tracking import RecordingTracker
from components.training.sft import train_sft
from tasks import base, ingest

pytestmark = pytest.mark.slow


def _train(project: Path, padding_free: bool, spied: dict[str, Any]) -> tuple[list[dict], dict]:
    from transformers import Trainer

    params = load_params("params.yaml")
    cfg = dataclasses.replace(params.sft, padding_free=padding_free, epochs=1)
    records = read_jsonl(project / "data/processed/sft_train.jsonl")[:64]
    out = project / f"sft-{padding_free}"
    original = Trainer.training_step

    def training_step(self, model, inputs, *args, **kwargs):  # noqa: ANN001, ANN202 - HF signature
        spied.setdefault(padding_free, []).append({k: v.clone() for k, v in inputs.items() if k in SPY})
        return original(self, model, inputs, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "training_step", training_step)
        work = project / f"work-{padding_free}"  # one checkpoint dir per run: no resuming the other
        history, _ = train_sft(cfg, Path(params.paths.base_model), records, [], out, RecordingTracker(), work)
    return history, load_file(str(out / "adapter_model.safetensors"))


SPY = ("input_ids", "attention_mask", "position_ids", "labels")


def test_padding_free_batches_train_exactly_like_padded_ones(tiny_project: Path) -> None:
    params = load_params("params.yaml")
    base.run(params, RecordingTracker())
    ingest.run(params, RecordingTracker())
    spied: dict[bool, list[dict[str, torch.Tensor]]] = {}
    padded_history, padded = _train(tiny_project, False, spied)
    free_history, free = _train(tiny_project, True, spied)

    first_padded, first_free = spied[False][0], spied[True][0]
    assert first_padded["input_ids"].shape[0] == params.sft.batch_size
    assert (first_padded["attention_mask"] == 0).any(), "the padded run had nothing to pad"
    assert first_free["input_ids"].shape[0] == 1 and "attention_mask" not in first_free
    real_tokens = int(first_padded["attention_mask"].sum())
    assert first_free["input_ids"].shape[1] == real_tokens  # every real token, no pad
    # the sequences restart their positions: one block per example
    assert int((first_free["position_ids"][0] == 0).sum()) == params.sft.batch_size

    losses = [h["loss"] for h in padded_history if "loss" in h]
    free_losses = [h["loss"] for h in free_history if "loss" in h]
    assert losses and len(losses) == len(free_losses)
    assert free_losses == pytest.approx(losses, rel=1e-4)
    assert padded.keys() == free.keys()
    for name in padded:
        torch.testing.assert_close(free[name], padded[name], rtol=1e-3, atol=1e-5)
    assert any(torch.count_nonzero(t) for n, t in padded.items() if "lora_B" in n)
