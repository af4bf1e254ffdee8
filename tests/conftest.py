"""Shared test setup: offline, 2 threads, and a tiny copy of the project to run stages in.

``tiny_params()`` is the shipped ``params.yaml`` with every stage scaled down so the whole DAG
trains in about a minute on 2 cores; tests run real TRL/PEFT training, real MLflow on sqlite,
real Milvus Lite and real DVC on it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import components  # noqa: F401 - applies components.environment (offline, 2 threads) first

ROOT = Path(__file__).resolve().parents[1]

TINY_OVERRIDES = {
    # The pinned figures (tests/integration/golden_values.py) are CPU fp32 figures, also on a GPU box.
    "compute": {"device": "cpu"},
    "base": {
        "vocab_size": 300,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_layers": 2,
        "num_heads": 2,
        "max_position_embeddings": 64,
        "pretrain_epochs": 1,
        "pretrain_batch_size": 16,
        "pretrain_block_size": 32,
    },
    "ingest": {"n_sft_train": 160, "n_sft_eval": 16, "n_preference_prompts": 48, "n_eval_prompts": 16},
    "sft": {
        "epochs": 2,
        "learning_rate": 0.005,
        "batch_size": 16,
        "warmup_steps": 2,
        "peft": {"lora": {"r": 4, "alpha": 8}},
    },
    "preferences": {"k": 4, "max_prompts": 48, "batch_size": 48, "max_new_tokens": 6},
    "reward_model": {"epochs": 1, "batch_size": 8},
    # dpo: the pinned chain (golden_values.py); tests/integration/test_align_methods.py runs the others
    "align": {
        "method": "dpo",
        # the tiny test policy is always wrong: near-miss credit keeps the reports' rewards nonzero
        "partial_credit": True,
        "n_report_prompts": 8,
        "peft": {"lora": {"r": 4, "alpha": 8}},
        "dpo": {"epochs": 1, "batch_size": 8},
        # beta > 0: the KL reference (adapter disabled, or a saved SFT copy) stays under test
        "grpo": {"steps": 3, "prompts_per_step": 4, "num_generations": 4, "max_new_tokens": 6, "beta": 0.02},
        "rloo": {"steps": 3, "prompts_per_step": 4, "num_generations": 4, "max_new_tokens": 6},
        "ppo": {"steps": 3, "batch_size": 8, "minibatch_size": 4, "max_new_tokens": 6},
    },
    "compress": {"n_fidelity_prompts": 8},
    "evaluate": {"n_prompts": 16, "n_samples": 2, "max_new_tokens": 6},
    # ~400 characters (5 per token): smaller chunks than the shipped 128 tokens, as before
    "rag_index": {"chunk_tokens": 80, "chunk_overlap_tokens": 16},
    "multimodal": {
        "n_train": 48,
        "n_eval": 12,
        "image_size": 96,
        "steps": 12,
        "batch_size": 8,
        "flamingo": {"num_latents": 4, "dim": 32},
        "palme": {"hidden": 64},
    },
}


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) else value
    return out


def tiny_params() -> dict:
    """The shipped params scaled down (same keys, so the contract still holds)."""
    return _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY_OVERRIDES)


def make_project(dest: Path, corpus_lines: int = 600) -> Path:
    """A copy of the project's pipeline files with tiny params and a short corpus."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "dvc.yaml", dest / "dvc.yaml")
    for sub in ("data/tasks", "data/docs", "data/rag_eval"):  # rag_eval: the stage's question set
        shutil.copytree(ROOT / sub, dest / sub)
    for code in ("components", "tasks"):  # dvc.yaml lists the stage code as deps
        shutil.copytree(ROOT / code, dest / code, ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "data/corpus").mkdir(parents=True)
    lines = (ROOT / "data/corpus/pretrain.txt").read_text().splitlines()[:corpus_lines]
    (dest / "data/corpus/pretrain.txt").write_text("\n".join(lines) + "\n")
    params = tiny_params()
    params["tracking"]["log_models"] = "none"
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def sh(cmd: list[str], cwd: Path, timeout: int = 1200, **kw) -> subprocess.CompletedProcess:
    """Run a command that must succeed; on failure the assertion shows the ends of its output."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def make_repo(dest: Path, remote: Path | None = None) -> Path:
    """:func:`make_project` as a user's clone: a committed git + DVC repo (with a local remote if given)."""
    root = make_project(dest)
    root.joinpath("models").mkdir()
    shutil.copy(ROOT / ".gitignore", root / ".gitignore")
    sh(["git", "init", "-q"], root)
    sh(["git", "config", "user.email", "t@example.com"], root)
    sh(["git", "config", "user.name", "t"], root)
    sh([sys.executable, "-m", "dvc", "init", "-q"], root)
    if remote is not None:
        sh([sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(remote)], root)
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "init"], root)
    return root


@pytest.fixture
def tiny_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    project = make_project(tmp_path / "project")
    monkeypatch.chdir(project)
    return project


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests run only where CUDA exists."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
