"""Read the stage DAG from ``dvc.yaml``: the flow's order and ``posttrain status`` both come from here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from components.errors import MissingInputError


def load_stages(repo_dir: Path | str = ".") -> dict[str, dict[str, Any]]:
    path = Path(repo_dir) / "dvc.yaml"
    if not path.is_file():
        raise MissingInputError(f"{path}: not found (run posttrain from the project root)")
    return yaml.safe_load(path.read_text())["stages"]


def _paths(entries: list[Any]) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def _covers(out: str, dep: str) -> bool:
    return dep == out or dep.startswith(out.rstrip("/") + "/") or out.startswith(dep.rstrip("/") + "/")


def upstream(stages: dict[str, dict[str, Any]]) -> dict[str, set[str]]:
    """stage -> the stages whose outputs it depends on."""
    outs = {name: _paths(s.get("outs", [])) for name, s in stages.items()}
    return {
        name: {
            other
            for dep in _paths(s.get("deps", []))
            for other, other_outs in outs.items()
            if other != name and any(_covers(o, dep) for o in other_outs)
        }
        for name, s in stages.items()
    }


def topological_order(stages: dict[str, dict[str, Any]]) -> list[str]:
    """Kahn's algorithm, always taking the ready stage listed first in ``dvc.yaml`` (deterministic)."""
    graph = upstream(stages)
    order: list[str] = []
    while len(order) < len(stages):
        ready = [n for n in stages if n not in order and graph[n] <= set(order)]
        if not ready:
            raise ValueError(f"dvc.yaml has a cycle among {sorted(set(stages) - set(order))}")
        order.append(ready[0])
    return order


def descendants(stages: dict[str, dict[str, Any]], roots: set[str]) -> set[str]:
    """Every stage downstream of ``roots`` (not including them)."""
    graph = upstream(stages)
    found: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, ups in graph.items():
            if name not in found and name not in roots and ups & (roots | found):
                found.add(name)
                changed = True
    return found


def changed_stages(repo_dir: Path | str, stages: list[str] | None = None) -> dict[str, Any]:
    """In-process ``dvc status`` of the given stages (all when None): {stage: reasons} of the changed ones."""
    from dvc.repo import Repo

    with Repo(str(repo_dir)) as repo:
        status = repo.status(targets=stages) if stages else repo.status()
    return {name.split(":")[-1]: reasons for name, reasons in status.items()}
