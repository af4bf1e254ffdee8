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
import re
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
    if main:
        clean_stale_work_dirs(target)
    # The owner's pid is in the name, so a later run can tell a dead attempt's leftovers from a live one.
    pid = os.getpid()
    prefix = f".{target.name}.tmp-{pid}-" if main else f".{target.name}.tmp-rank{rank()}-{pid}-"
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


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (a zombie or another user's counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ``.<name>.tmp-<pid>-<random>``, ``.<name>.tmp-rank<r>-<pid>-<random>`` and ``.<name>.old-<pid>``.
_WORK_DIR_OWNER = re.compile(r"^\.(?:tmp-(?:rank\d+-)?(\d+)-.*|old-(\d+))$")


def clean_stale_work_dirs(target: Path | str) -> list[Path]:
    """Remove the work directories of ``target`` that :func:`atomic_dir` left behind in a process that died.

    Only entries whose owner pid (in the name) is no longer alive are touched; names without a
    pid (written before pids were recorded) are left alone. A dead ``.old-<pid>`` is the previous
    output, moved aside just before a crash: it is renamed back when ``target`` is missing.
    Returns the removed (or restored) paths.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return []
    touched = []
    for entry in sorted(target.parent.iterdir()):
        if not entry.name.startswith(f".{target.name}."):
            continue
        match = _WORK_DIR_OWNER.match(entry.name[len(target.name) + 1 :])
        if match is None or pid_alive(int(match.group(1) or match.group(2))):
            continue
        if match.group(2) and not target.exists():
            entry.rename(target)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        touched.append(entry)
    return touched


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


# --------------------------------------------------------------------------- last good outputs
#
# ``dvc repro`` deletes a stage's outputs before it runs the command, and does not put them back
# when the command fails. The outputs recorded in ``dvc.lock`` are the last good state: cached
# outputs are in the DVC cache; uncached ones (metrics, plots: ``cache: false``) are kept by
# content hash in ``KEEP_DIR`` whenever a stage succeeds, or found in git's HEAD. After a failure
# every output of the stage that is *missing* is rebuilt from those, byte for byte (md5-checked).

KEEP_DIR = Path(".dvc/tmp/posttrain-keep")


def _md5_file(path: Path) -> str:
    digest = hashlib.md5()  # noqa: S324 - DVC's content hash, not a security boundary
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stage_name(stage: str) -> str:
    return stage.split(":")[-1]  # DVC_STAGE is "dvc.yaml:name" for a dvc.yaml outside the root


def _uncached_paths(stage: str, root: Path) -> list[str]:
    """The ``cache: false`` outs, metrics and plots of ``stage`` in ``root/dvc.yaml``."""
    try:
        spec = yaml.safe_load((root / "dvc.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    entry = (spec.get("stages") or {}).get(_stage_name(stage)) or {}
    paths = []
    for key in ("outs", "metrics", "plots"):
        for item in entry.get(key) or []:
            if isinstance(item, dict):
                paths += [path for path, opts in item.items() if (opts or {}).get("cache") is False]
    return paths


def _lock_outs(root: Path, stage: str | None = None) -> list[dict[str, Any]]:
    """The outs recorded in ``dvc.lock`` (of one stage, or of all) that carry a DVC 3 md5."""
    try:
        lock = yaml.safe_load((root / "dvc.lock").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    stages = lock.get("stages") or {}
    entries = [stages.get(_stage_name(stage)) or {}] if stage else list(stages.values())
    return [
        out
        for entry in entries
        for out in entry.get("outs") or []
        if out.get("hash") == "md5" and out.get("md5") and out.get("path")
    ]


def keep_uncached_outputs(stage: str, root: Path | str = ".") -> list[str]:
    """Copy the stage's uncached outputs into ``KEEP_DIR`` by md5; drop kept copies no lock refers to."""
    root = Path(root)
    keep = root / KEEP_DIR
    saved = set()
    for rel in _uncached_paths(stage, root):
        path = root / rel
        if not path.is_file():
            continue
        md5 = _md5_file(path)
        saved.add(md5)
        if not (keep / md5).is_file():
            keep.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{md5}.", dir=keep)
            os.close(fd)
            shutil.copyfile(path, tmp)
            os.replace(tmp, keep / md5)
    if keep.is_dir():  # keep what dvc.lock points at (the last good state) and what was just saved
        wanted = saved | {out["md5"] for out in _lock_outs(root)}
        for kept in keep.iterdir():
            if kept.name not in wanted and not kept.name.startswith("."):
                kept.unlink(missing_ok=True)
    return sorted(saved)


def _git_head_bytes(root: Path, rel: str) -> bytes | None:
    try:
        proc = subprocess.run(
            ["git", "show", f"HEAD:./{rel}"], cwd=root, capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _restore_file(dest: Path, md5: str, sources: list[Path], root: Path, rel: str | None) -> bool:
    """Write ``dest`` (atomically, mode 0644) from the first source whose md5 is ``md5``."""
    data = None
    source = next((src for src in sources if src.is_file() and _md5_file(src) == md5), None)
    if source is None and rel is not None:
        data = _git_head_bytes(root, rel)
        if data is None or hashlib.md5(data).hexdigest() != md5:  # noqa: S324
            return False
    elif source is None:
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if data is not None:
                fh.write(data)
            else:
                with source.open("rb") as src:
                    shutil.copyfileobj(src, fh)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def restore_missing_outputs(
    stage: str, root: Path | str = ".", cache_dir: Path | str | None = None
) -> list[str]:
    """Rebuild every output of ``stage`` that ``dvc.lock`` records and the workspace lacks.

    Sources, each md5-checked: the DVC cache (``cache_dir``, DVC 3's ``files/md5`` directory,
    by default ``.dvc/cache/files/md5``: cached outputs, and uncached ones the run cache saved),
    ``KEEP_DIR`` and git's HEAD. An output already present is never touched (it may be newer
    than the lock). Returns the restored paths.
    """
    root = Path(root).resolve()
    cache = Path(cache_dir) if cache_dir is not None else root / ".dvc/cache/files/md5"
    restored = []
    for out in _lock_outs(root, stage):
        rel, md5 = out["path"], out["md5"]
        dest = root / rel
        if dest.exists():
            continue
        if md5.endswith(".dir"):
            listing = cache / md5[:2] / md5[2:]
            if not listing.is_file():
                continue
            try:
                entries = json.loads(listing.read_text())
            except (OSError, ValueError):
                continue
            try:
                with atomic_dir(dest) as tmp:
                    for entry in entries:
                        oid, file = entry["md5"], tmp / entry["relpath"]
                        if not _restore_file(
                            file, oid, [cache / oid[:2] / oid[2:], root / KEEP_DIR / oid], root, None
                        ):
                            raise FileNotFoundError(f"{rel}/{entry['relpath']}: not in the DVC cache")
            except FileNotFoundError:
                continue
        elif not _restore_file(dest, md5, [cache / md5[:2] / md5[2:], root / KEEP_DIR / md5], root, rel):
            continue
        restored.append(rel)
    return restored
