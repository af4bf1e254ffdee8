"""A local ``base.model`` directory as a DVC dependency of the ``base`` stage.

``base.model`` may name a checkpoint directory on disk. Its files decide what ``base`` writes,
so DVC must hash them: editing a weight file has to make ``base`` (and everything after it)
stale. DVC reads deps from ``dvc.yaml`` only, and a param value cannot be a conditional dep
there (``tiny`` or a bundled name is not a path), so the entry is kept in sync instead:
``posttrain run`` and ``posttrain status`` add the directory to ``stages.base.deps`` (marked
with a comment) and drop an entry they added for a previous ``base.model``. A plain ``dvc
repro`` with a directory that is not listed fails in ``base`` with one line that says so
(:func:`components.models.local.missing_model_dep`), rather than silently tracking nothing.
"""

from __future__ import annotations

import io
from pathlib import Path

from components.artifacts import write_text_atomic
from components.models.local import local_model_dir

MARK = "base.model (kept in sync by posttrain)"


def sync_model_dep(model: str, repo_dir: Path | str = ".") -> str | None:
    """Make ``stages.base.deps`` list the local ``base.model`` directory (and no stale one); what changed."""
    from ruamel.yaml import YAML

    wanted = local_model_dir(model, repo_dir)
    path = Path(repo_dir) / "dvc.yaml"
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    tree = rt.load(path.read_text())
    deps = tree["stages"]["base"]["deps"]
    managed = [i for i in range(len(deps)) if MARK in _comment(deps, i)]
    current = [str(deps[i]) for i in managed]
    if current == ([wanted] if wanted else []):
        return None
    for i in reversed(managed):
        del deps[i]
    if wanted:
        deps.append(wanted)
        deps.yaml_add_eol_comment(MARK, len(deps) - 1)
    buffer = io.StringIO()
    rt.dump(tree, buffer)
    write_text_atomic(path, buffer.getvalue())
    removed = ", ".join(current)
    if wanted and removed:
        return f"dvc.yaml: base now depends on {wanted} (base.model) instead of {removed}"
    if wanted:
        return f"dvc.yaml: base now depends on {wanted} (base.model), so editing its files re-runs base"
    return f"dvc.yaml: base no longer depends on {removed} (base.model is not a local directory now)"


def _comment(seq: object, index: int) -> str:
    items = getattr(getattr(seq, "ca", None), "items", {})
    tokens = items.get(index) or []
    return " ".join(t.value for t in tokens if t is not None and hasattr(t, "value"))
