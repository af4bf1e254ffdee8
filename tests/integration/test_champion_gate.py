"""The gate end to end on a real MLflow registry: first champion, a collapse kept out, a better one in.

The tiny chain runs once; then ``align`` is re-run three ways and ``compress``/``evaluate``
follow, as ``dvc repro`` would:

1. ``align`` at learning rate 0 (the candidate is the SFT policy): the first champion;
2. ``align`` at a collapsing learning rate, with a changed suite: not promoted, the champion
   is re-scored from the registry, and ``models:/posttrain-policy@champion`` still loads v1;
3. ``align`` at learning rate 0 with another seed (a new candidate, as good as SFT): promoted,
   and the alias points at the version its own run registered;
4. under ``tracking.log_models: adapters``, a collapse is not registered at all, and the next
   winner is registered only once it has passed.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from components.params import load_params
from tests.conftest import make_project

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory):
    root = make_project(tmp_path_factory.mktemp("gate") / "project")
    edit(root, {"tracking": {"log_models": "all"}, "compress": {"method": "none"}})
    edit(root, {"evaluate": {"promotion_metric": "reward_mean"}, "align": {"dpo": {"learning_rate": 0.0}}})
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for stage in ("base", "ingest", "sft", "preferences", "reward_model"):
            stage_cmd(stage)
        yield root


def edit(root: Path, changes: dict) -> None:
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())

    def merge(into: dict, new: dict) -> None:
        for k, v in new.items():
            merge(into[k], v) if isinstance(v, dict) else into.__setitem__(k, v)

    merge(params, changes)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def stage_cmd(name: str) -> dict:
    from tasks.stage import run_stage

    return run_stage(name, importlib.import_module(f"tasks.{name}").run)


def candidate_round() -> dict:
    for stage in ("align", "compress", "evaluate"):
        stage_cmd(stage)
    from tasks.promote import promote
    from tasks.tracking import stage_run

    params = load_params("params.yaml")
    with stage_run("promote", params.tracking) as tracker:
        return promote(params, tracker)


def champion() -> str:
    return str(MlflowClient().get_model_version_by_alias("posttrain-policy", "champion").version)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[5, 6, 7, 8]])).logits


def test_gate_keeps_the_best_model(project: Path) -> None:
    from components.models.loading import load_causal_lm

    first = candidate_round()
    assert first["promoted"] and first["champion_before"] is None, first
    assert champion() == first["version"] == "1"
    v1 = load_causal_lm(project / "models/compressed/merged")
    shutil.copytree(project / "models/compressed/merged", project.parent / "v1")

    # The same lineage again (what a run-cache restore looks like): no new version, alias intact.
    params = load_params("params.yaml")
    from tasks.promote import promote
    from tasks.tracking import stage_run

    with stage_run("promote", params.tracking) as tracker:
        again = promote(params, tracker)
    assert again["version"] == "1" and again["champion_metrics_source"] == "self"
    assert len(MlflowClient().search_model_versions("name='posttrain-policy'")) == 1

    edit(project, {"align": {"dpo": {"learning_rate": 1.0, "epochs": 2}}, "evaluate": {"n_samples": 3}})
    collapsed = candidate_round()
    assert not collapsed["promoted"], collapsed
    assert collapsed["candidate"]["reward_mean"] < collapsed["sft"]["reward_mean"]
    assert collapsed["champion_metrics_source"] == "rescored"  # the suite changed (n_samples)
    assert collapsed["version"] == "2" and champion() == "1"
    served = mlflow.transformers.load_model("models:/posttrain-policy@champion", return_type="components")
    torch.testing.assert_close(logits(served["model"].float()), logits(v1))
    assert not torch.allclose(logits(load_causal_lm(project / "models/compressed/merged")), logits(v1))

    edit(project, {"align": {"seed": 1, "dpo": {"learning_rate": 0.0}}})
    better = candidate_round()
    assert better["promoted"] and better["champion_before"] == "1", better
    assert champion() == better["version"] == "3"
    client = MlflowClient()
    version = client.get_model_version("posttrain-policy", better["version"])
    assert version.run_id == better["run_id"] == mlflow.last_active_run().info.run_id
    tags = version.tags
    assert tags["posttrain.candidate_sha256"] and tags["posttrain.git_commit"]
    assert float(tags["posttrain.metric.reward_mean"]) == pytest.approx(better["candidate"]["reward_mean"])

    from flows.registry import format_versions, list_versions

    table = format_versions(list_versions(load_params("params.yaml").tracking), "champion")
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:4]}
    assert [rows[v][1:3] for v in ("1", "2", "3")] == [["-", "true"], ["-", "false"], ["@champion", "true"]]
    assert "below sft" in " ".join(rows["2"])

    # log_models: adapters: the registry gets a full copy only of a candidate that wins.
    edit(
        project, {"tracking": {"log_models": "adapters"}, "align": {"seed": 2, "dpo": {"learning_rate": 1.0}}}
    )
    loser = candidate_round()
    assert not loser["promoted"] and loser["version"] is None, loser
    assert len(client.search_model_versions("name='posttrain-policy'")) == 3 and champion() == "3"
    edit(project, {"align": {"seed": 3, "dpo": {"learning_rate": 0.0}}})
    winner = candidate_round()
    assert winner["promoted"] and winner["champion_before"] == "3", winner
    assert champion() == winner["version"] == "4"
    assert client.get_model_version("posttrain-policy", "4").tags["posttrain.promoted"] == "true"
