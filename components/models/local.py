"""``base.model`` as a local directory: the path DVC must hash, and the check that it does.

Import-light on purpose (no torch, no transformers): ``posttrain run`` and ``status`` call it
before anything else, and ``tasks.base`` calls it first under ``dvc repro``. See
:mod:`flows.model_dep` for why the ``dvc.yaml`` entry is kept in sync rather than declared.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from components.models import bundled


def local_model_dir(model: str, repo_dir: Path | str = ".") -> str | None:
    """The dep path of a local ``base.model`` directory: repo-relative inside the repo, else absolute."""
    if model == "tiny" or bundled.is_bundled(model) or not Path(model).is_dir():
        return None
    path, repo = Path(model).resolve(), Path(repo_dir).resolve()
    return str(path.relative_to(repo)) if path.is_relative_to(repo) else str(path)


def _base_deps(repo_dir: Path | str) -> list[str]:
    stages = yaml.safe_load((Path(repo_dir) / "dvc.yaml").read_text()).get("stages", {})
    deps = stages.get("base", {}).get("deps", [])
    return [next(iter(d)) if isinstance(d, dict) else d for d in deps]


def missing_model_dep(model: str, repo_dir: Path | str = ".") -> str | None:
    """A one-line problem when ``base.model`` is a local directory that ``dvc.yaml`` does not list."""
    wanted = local_model_dir(model, repo_dir)
    if wanted is None or wanted in _base_deps(repo_dir):
        return None
    return (
        f"base.model: {model} is a local directory but not a dep of the base stage in dvc.yaml, so "
        f"changing its files would not re-run base; add `- {wanted}` under stages.base.deps "
        "(`posttrain run` does this for you)"
    )
