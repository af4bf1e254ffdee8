"""Work directories of atomic_dir carry their owner's pid; a dead owner's are cleaned on the next run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from components.artifacts import atomic_dir, clean_stale_work_dirs, pid_alive


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_work_dir_names_carry_the_owner_pid(tmp_path: Path) -> None:
    with atomic_dir(tmp_path / "out") as tmp:
        assert tmp.name.startswith(f".out.tmp-{os.getpid()}-")


def test_pid_alive() -> None:
    assert pid_alive(os.getpid()) and not pid_alive(_dead_pid()) and not pid_alive(0)


def test_only_dead_owners_work_dirs_are_removed(tmp_path: Path) -> None:
    dead, me = _dead_pid(), os.getpid()
    target = tmp_path / "processed"
    target.mkdir()
    stale = [tmp_path / f".processed.tmp-{dead}-abc", tmp_path / f".processed.tmp-rank1-{dead}-x_1"]
    live = [tmp_path / f".processed.tmp-{me}-abc", tmp_path / ".processed.tmp-_6ohn80f"]  # legacy: no pid
    others = [tmp_path / f".other.tmp-{dead}-abc"]
    for d in stale + live + others:
        d.mkdir()
        (d / "partial.bin").write_bytes(b"x")
    (tmp_path / f".processed.old-{dead}").mkdir()
    removed = clean_stale_work_dirs(target)
    assert sorted(removed) == sorted([*stale, tmp_path / f".processed.old-{dead}"])
    assert all(d.exists() for d in live + others) and target.is_dir()


def test_next_atomic_dir_cleans_up(tmp_path: Path) -> None:
    stale = tmp_path / f".out.tmp-{_dead_pid()}-abc"
    stale.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_dead_owners_moved_aside_output_comes_back_when_the_target_is_missing(tmp_path: Path) -> None:
    old = tmp_path / f".out.old-{_dead_pid()}"  # died between the two renames of atomic_dir
    old.mkdir()
    (old / "weights.bin").write_bytes(b"good")
    clean_stale_work_dirs(tmp_path / "out")
    assert (tmp_path / "out/weights.bin").read_bytes() == b"good" and not old.exists()
