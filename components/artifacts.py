"""Atomic, self-describing stage outputs.

A stage writes into a temporary sibling directory and renames it into place only when it has
finished, so a crash never leaves a half-written output that looks complete. Every output
directory carries ``config.yaml`` (the resolved config), ``manifest.json`` (input hashes,
library versions, seed) and, where the stage has them, ``metrics.json``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from components.distributed import is_main_process, rank

LIBRARIES = ("torch", "transformers", "trl", "peft", "tokenizers", "pymilvus", "unstructured")


@contextmanager
def atomic_dir(target: Path | str) -> Iterator[Path]:
    """Yield a temp directory next to ``target``; on success it replaces ``target`` in one rename.

    On a non-zero DDP rank the directory is scratch: the worker may write into it as rank 0
    does, but it is deleted instead of renamed, so only rank 0 produces the output.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    main = is_main_process()
    prefix = f".{target.name}.tmp-" if main else f".{target.name}.tmp-rank{rank()}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; outputs should have normal directory permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not main:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: Path | str, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename (mode 0644); no temp file survives."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path | str, data: Any) -> None:
    """Write JSON to ``path`` atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def hash_path(path: Path | str) -> str:
    """sha256 of a file, or of a directory's relative paths and contents (sorted, dotfiles skipped)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        rel = file.relative_to(path).as_posix() if path.is_dir() else file.name
        if any(part.startswith(".") for part in Path(rel).parts):
            continue
        # Length-prefixed name and size: ("a", "bc") and ("ab", "c") must not hash alike.
        digest.update(f"{len(rel)}:{rel}:{file.stat().st_size}:".encode())
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def code_version() -> str:
    """The git commit of the working tree (with ``-dirty``), or ``unknown`` outside git.

    Recorded as an MLflow tag, not in ``manifest.json``: a commit that leaves a stage's code
    unchanged must not change its output bytes (DVC would re-run everything downstream, and
    ``dvc repro`` would no longer reproduce outputs bit for bit).
    """
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def describe_output(
    out_dir: Path,
    *,
    stage: str,
    config: dict[str, Any],
    inputs: dict[str, Path | str],
    seed: int | None,
    metrics: dict[str, Any] | None = None,
) -> None:
    """Write ``config.yaml``, ``manifest.json`` and ``metrics.json`` into an output directory."""
    out_dir = Path(out_dir)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    manifest = {
        "stage": stage,
        "seed": seed,
        "libraries": library_versions(),
        "inputs": {name: hash_path(p) for name, p in inputs.items() if Path(p).exists()},
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if metrics is not None:
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
