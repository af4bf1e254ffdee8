"""The model registry path: the transformers flavor logs and registers a policy, the gate's alias resolves."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from components.models import tiny
from components.models.loading import save_model
from components.params import BaseConfig, load_params
from tasks.tracking import set_registry_alias, stage_run

pytestmark = pytest.mark.slow


def test_registered_policy_gets_the_champion_alias_and_loads(tiny_project: Path, tmp_path: Path) -> None:
    cfg = BaseConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, vocab_size=280)
    tok = tiny.build_tokenizer([f"{i} plus {i} makes {2 * i}" for i in range(100)], cfg.vocab_size)
    model = tiny.build_model(cfg, tok)
    save_model(model, tok, tmp_path / "policy")
    tracking = load_params("params.yaml").tracking

    with stage_run("compress", tracking) as tracker:
        tracker.log_model(tmp_path / "policy", name="policy", registered_name=tracking.registered_model)
    version = set_registry_alias(tracking, "champion")

    client = MlflowClient()
    assert version == "1"
    assert str(client.get_model_version_by_alias(tracking.registered_model, "champion").version) == "1"
    pipe = mlflow.transformers.load_model(f"models:/{tracking.registered_model}@champion")
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(pipe.model(ids).logits, model.eval()(ids).logits)
