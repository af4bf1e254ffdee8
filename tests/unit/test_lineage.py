"""Lineage is complete: every project file a stage's command can import is among its ``deps``.

The closure is derived, not listed: starting from ``tasks/<stage>.py`` (what ``python -m
tasks.<stage>`` runs), every ``import`` statement anywhere in a module (top level or inside a
function, since lazy imports run too) that names a project module is followed, packages
included. Each project file reached must be covered by a ``deps`` entry of the stage in
``dvc.yaml``: the file itself, or a folder above it. Otherwise editing it could change the
stage's output while DVC reports the stage up to date.

The exemptions are plumbing that cannot change an output's bytes; each says why. No file with
model, data, training, loading or evaluation logic belongs here.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("components", "tasks", "flows")

EXEMPT: dict[str, str] = {
    "components/errors.py": "exception classes: a message text, never output bytes",
    "components/tracking.py": "the Tracker protocol and an in-memory fake; no behaviour of its own",
    "tasks/tracking.py": "MLflow logging (runs, params, models): writes the tracking store, not outputs",
    "tasks/stage.py": "the stage runner: loads params, opens the MLflow run, prints one-line errors",
}


def _is_empty_module(path: Path) -> bool:
    """A package marker with at most a docstring cannot change anything."""
    body = ast.parse(path.read_text()).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def _module_file(root: Path, module: str) -> Path | None:
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = root.joinpath(*parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _imported_modules(path: Path, module: str) -> set[str]:
    """Every module an import statement in ``path`` names (``from a import b`` may name ``a.b``)."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    # importing a.b.c runs a/__init__.py and a/b/__init__.py first
    return {".".join(m.split(".")[:i]) for m in found for i in range(1, len(m.split(".")) + 1)}


def import_closure(root: Path, start: str) -> set[str]:
    """Project files (paths relative to ``root``) reachable by imports from module ``start``."""
    seen: set[str] = set()
    todo = [start]
    files: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = _module_file(root, module)
        if path is None:
            continue
        files.add(path.relative_to(root).as_posix())
        todo.extend(_imported_modules(path, module) - seen)
    return files


def uncovered_files(root: Path) -> dict[str, list[str]]:
    """stage -> project files in its import closure that none of its deps covers (and are not exempt)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    out: dict[str, list[str]] = {}
    for name, stage in stages.items():
        module = stage["cmd"].split("-m", 1)[1].split()[0]
        deps = [d.rstrip("/") for d in stage.get("deps", [])]
        missing = sorted(
            f
            for f in import_closure(root, module)
            if f not in EXEMPT
            and not _is_empty_module(root / f)
            and not any(f == d or f.startswith(d + "/") for d in deps)
        )
        if missing:
            out[name] = missing
    return out


def test_every_stage_depends_on_every_project_file_it_imports():
    missing = uncovered_files(ROOT)
    assert not missing, "dvc.yaml deps miss files that can change stage outputs:\n" + "\n".join(
        f"  {stage}: {', '.join(files)}" for stage, files in missing.items()
    )


def test_exemptions_are_real_files_and_stay_plumbing():
    for path in EXEMPT:
        assert (ROOT / path).is_file(), f"exemption for a file that does not exist: {path}"
    assert len(EXEMPT) <= 5


def test_closure_follows_lazy_and_package_imports():
    closure = import_closure(ROOT, "tasks.evaluate")
    assert "components/data/verifier.py" in closure  # via evaluation.suite
    assert "tasks/tracking.py" in closure  # imported lazily inside a function of tasks/stage.py
    assert "components/__init__.py" in closure  # the package runs before any of its modules


def _copy_project(dest: Path) -> Path:
    for part in ("components", "tasks"):
        shutil.copytree(ROOT / part, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", dest / "dvc.yaml")
    return dest


def test_removing_one_dep_is_caught(tmp_path: Path):
    """The negative twin: drop the verifier from evaluate's deps in a copy; the check must fail."""
    project = _copy_project(tmp_path / "p")
    dvc = yaml.safe_load((project / "dvc.yaml").read_text())
    deps = dvc["stages"]["evaluate"]["deps"]
    target = "components/data/verifier.py"
    covering = [d for d in deps if target == d or target.startswith(d + "/")]
    assert covering, "evaluate must depend on the verifier"
    dvc["stages"]["evaluate"]["deps"] = [d for d in deps if d not in covering]
    (project / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    missing = uncovered_files(project)
    assert "components/data/verifier.py" in missing.get("evaluate", [])


def test_a_new_lazy_import_is_caught(tmp_path: Path):
    """A new helper module imported inside a function of a stage must become a dep too."""
    project = _copy_project(tmp_path / "p")
    (project / "tasks" / "helper_x.py").write_text("VALUE = 1\n")
    sft = project / "tasks" / "sft.py"
    sft.write_text(
        sft.read_text() + "\n\ndef _late():\n    from tasks import helper_x\n\n    return helper_x\n"
    )
    assert "tasks/helper_x.py" in uncovered_files(project).get("sft", [])
