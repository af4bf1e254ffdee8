"""Atomic outputs: a crash never leaves a half-written directory; hashes track content."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import yaml

from components.artifacts import atomic_dir, describe_output, hash_path, write_json_atomic, write_text_atomic


class Boom(RuntimeError):
    pass


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


# --------------------------------------------------------------------------- atomic_dir


def test_atomic_dir_creates_target_on_success(tmp_path):
    target = tmp_path / "nested" / "out"
    with atomic_dir(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        assert not target.exists()  # nothing visible until the block finishes
        (tmp / "weights.bin").write_bytes(b"\x00\x01")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("a")
    assert (target / "weights.bin").read_bytes() == b"\x00\x01"
    assert (target / "sub" / "a.txt").read_text() == "a"
    assert _siblings(target) == ["out"]  # no temp or backup directory left behind


def test_atomic_dir_replaces_previous_content(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    (target / "keep_name.txt").write_text("old")
    with atomic_dir(target) as tmp:
        (tmp / "keep_name.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["keep_name.txt"]  # old files are gone
    assert (target / "keep_name.txt").read_text() == "new"
    assert _siblings(target) == ["out"]


def test_atomic_dir_failure_leaves_no_target(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(Boom):
        with atomic_dir(target) as tmp:
            (tmp / "half.bin").write_bytes(b"partial")
            raise Boom("crash mid-write")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # the temp dir was removed


def test_atomic_dir_failure_keeps_previous_content(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "model.bin").write_text("complete")
    with pytest.raises(Boom):
        with atomic_dir(target) as tmp:
            (tmp / "model.bin").write_text("half")
            raise Boom
    assert sorted(p.name for p in target.iterdir()) == ["model.bin"]
    assert (target / "model.bin").read_text() == "complete"
    assert _siblings(target) == ["out"]


def test_atomic_dir_failure_on_keyboard_interrupt_cleans_up(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "x").write_text("x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask", [0o077, 0o022])
def test_atomic_dir_result_has_normal_permissions(tmp_path, umask):
    target = tmp_path / "out"
    old = os.umask(umask)
    try:
        with atomic_dir(target) as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755


# --------------------------------------------------------------------------- atomic files


def test_write_json_atomic_writes_sorted_json_and_replaces(tmp_path):
    path = tmp_path / "metrics" / "stage.json"
    write_json_atomic(path, {"b": 2, "a": {"y": [1, 2.5], "x": None}})
    text = path.read_text()
    assert json.loads(text) == {"a": {"x": None, "y": [1, 2.5]}, "b": 2}
    assert text.endswith("\n")
    assert text.index('"a"') < text.index('"b"')  # sorted keys: stable diffs in git/DVC
    write_json_atomic(path, {"c": 3})
    assert json.loads(path.read_text()) == {"c": 3}
    assert sorted(p.name for p in path.parent.iterdir()) == ["stage.json"]  # no temp files left


def test_write_json_atomic_failure_keeps_previous_file(tmp_path):
    path = tmp_path / "m.json"
    write_json_atomic(path, {"ok": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})  # not JSON-serialisable mid-write
    assert json.loads(path.read_text()) == {"ok": 1}


def test_write_json_atomic_failure_leaves_no_temp_file(tmp_path):
    path = tmp_path / "m.json"
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_write_json_atomic_has_normal_file_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "m.json", {"a": 1})
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(old)
    expected = stat.S_IMODE((tmp_path / "plain.json").stat().st_mode)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == expected


def test_write_text_atomic(tmp_path):
    path = tmp_path / "a" / "b.txt"
    write_text_atomic(path, "one")
    write_text_atomic(path, "two")
    assert path.read_text() == "two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["b.txt"]


# --------------------------------------------------------------------------- hash_path


def test_hash_path_of_a_file_tracks_content(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("one\n")
    first = hash_path(path)
    assert hash_path(path) == first
    # sha256 over the length-prefixed name, the size, then the bytes (manifests depend on this scheme)
    assert first == hashlib.sha256(b"10:data.jsonl:4:one\n").hexdigest()
    path.write_text("two\n")
    assert hash_path(path) != first
    path.write_text("one\n")
    assert hash_path(path) == first


def test_hash_path_of_a_directory_tracks_content_and_names(tmp_path):
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(b"a" * 10)
    (d / "sub" / "b.txt").write_text("b")
    first = hash_path(d)
    (d / "sub" / "b.txt").write_text("B")
    changed_content = hash_path(d)
    assert changed_content != first
    (d / "sub" / "b.txt").write_text("b")
    assert hash_path(d) == first
    (d / "sub" / "b.txt").rename(d / "sub" / "c.txt")
    assert hash_path(d) != first  # a rename is a change
    (d / "sub" / "c.txt").rename(d / "sub" / "b.txt")
    (d / "new.txt").write_text("")
    assert hash_path(d) != first  # an added (even empty) file is a change


def test_hash_path_is_location_independent_and_skips_dotfiles(tmp_path):
    a, b = tmp_path / "a" / "out", tmp_path / "b"
    for d in (a, b):
        d.mkdir(parents=True)
        (d / "w.bin").write_bytes(b"same")
    assert hash_path(a) == hash_path(b)
    (a / ".lock").write_text("ignored")
    (a / ".tmp-x").mkdir()
    (a / ".tmp-x" / "partial").write_text("ignored")
    assert hash_path(a) == hash_path(b)


def test_hash_path_distinguishes_name_content_boundaries(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "a").write_text("bc")
    (b / "ab").write_text("c")
    assert hash_path(a) != hash_path(b)


# --------------------------------------------------------------------------- describe_output


def test_describe_output_writes_self_description(tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text("{}\n")
    out = tmp_path / "out"
    out.mkdir()
    describe_output(
        out,
        stage="ingest",
        config={"seed": 3, "tasks": ["add"]},
        inputs={"data": data, "absent": tmp_path / "nope"},
        seed=3,
        metrics={"n": 1},
    )
    assert yaml.safe_load((out / "config.yaml").read_text()) == {"seed": 3, "tasks": ["add"]}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "ingest" and manifest["seed"] == 3
    assert manifest["inputs"] == {"data": hash_path(data)}  # missing inputs are not hashed
    assert "python" in manifest["libraries"] and "torch" in manifest["libraries"]
    assert "code_version" not in manifest  # output bytes must not depend on the git commit
    assert json.loads((out / "metrics.json").read_text()) == {"n": 1}


def test_describe_output_without_metrics_writes_no_metrics_file(tmp_path):
    describe_output(tmp_path, stage="s", config={}, inputs={}, seed=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "manifest.json"]
