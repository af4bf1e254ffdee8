"""Every project module imports: a misspelt or moved name breaks here, not in the middle of ``make run``.

The lineage test reads import statements without executing them, and most stage modules are only
imported by the pipeline itself, so ``from components.x import Name`` naming something that lives
elsewhere went unnoticed once until a stage failed at run time. Importing each module of
``components``, ``tasks``, ``flows`` and ``benchmarks`` executes those statements (module-level
imports only; function-level imports are the lineage test's business).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("components", "tasks", "flows", "benchmarks")


def _modules() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def test_the_walk_finds_the_stage_modules() -> None:
    modules = _modules()
    assert {"tasks.align", "tasks.rag_eval", "flows.cli", "components.rag.service"} <= set(modules)


@pytest.mark.parametrize("module", _modules())
def test_module_imports(module: str) -> None:
    importlib.import_module(module)
