"""A stage killed mid-training (SIGKILL) resumes from its last checkpoint and ends at the same weights.

Each case runs the stage's real command (``python -m tasks.<stage>``) three times on the tiny
project: once uninterrupted, once killed as soon as its first checkpoint is on disk, and once
more, which must say it resumed and must save the weights the uninterrupted run saved. The
upstream stages run once, into a project every case copies (then gives its stage more steps).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import make_project

pytestmark = pytest.mark.slow

UPSTREAM = ("base", "ingest", "sft", "preferences", "reward_model")
# case -> (stage, params overrides that give it enough steps to be killed mid-way,
# the saved weights file). Trainer-based stages checkpoint through Trainer; PPO is our own loop.
PPO = {"steps": 40, "batch_size": 8, "minibatch_size": 4, "max_new_tokens": 6}
CASES = {
    "sft": ("sft", {"sft": {"epochs": 8}}, "models/sft/adapter_model.safetensors"),
    "reward_model": (
        "reward_model",
        {"reward_model": {"epochs": 8, "batch_size": 4}},
        "models/reward_model/model.safetensors",
    ),
    "align-dpo": (
        "align",
        {"align": {"method": "dpo", "dpo": {"epochs": 8, "batch_size": 4}}},
        "models/aligned/adapter_model.safetensors",
    ),
    "align-ppo": (
        "align",
        {"align": {"method": "ppo", "ppo": PPO}},
        "models/aligned/adapter_model.safetensors",
    ),
}


def _stage(project: Path, stage: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(project)}
    return subprocess.Popen(
        [sys.executable, "-m", f"tasks.{stage}"], cwd=project, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **kw,
    )  # fmt: skip


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny project with every stage a case resumes (or reads) already run once."""
    project = make_project(tmp_path_factory.mktemp("resume") / "project")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["compute"]["checkpoint_steps"] = 5
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for name in UPSTREAM:
        _finish(_stage(project, name))
    return project


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_killed_stage_resumes_to_the_uninterrupted_weights(
    upstream: Path, tmp_path: Path, case: str
) -> None:
    stage, overrides, weights_file = CASES[case]
    project = tmp_path / "project"
    shutil.copytree(upstream, project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in overrides.items():
        for key, value in values.items():
            if isinstance(value, dict):
                params[section][key] = {**params[section][key], **value}
            else:
                params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    _finish(_stage(project, stage))
    uninterrupted = load_file(str(project / weights_file))
    checkpoints = project / ".posttrain/checkpoints" / stage
    assert not checkpoints.exists() or not any(checkpoints.iterdir()), "a finished stage keeps no checkpoints"

    proc = _stage(project, stage)
    deadline = time.monotonic() + 600
    while not list(checkpoints.glob("**/checkpoint-*/trainer_state.json")):  # dpo: <key>/round-N/
        assert proc.poll() is None, "the stage finished before a checkpoint could be killed into"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    time.sleep(0.2)  # let the checkpoint's last files land, as a real kill would find it
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    out = _finish(_stage(project, stage))
    assert "resuming from" in out and "checkpoint-" in out
    resumed = load_file(str(project / weights_file))
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    assert not checkpoints.exists(), "the resumed run cleared its checkpoints"
