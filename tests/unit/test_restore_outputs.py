"""After a failed stage, the outputs DVC deleted come back from dvc.lock: DVC cache, kept copies, git."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import yaml

from components.artifacts import KEEP_DIR, keep_uncached_outputs, restore_missing_outputs


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _project(root: Path) -> tuple[bytes, bytes, bytes]:
    """A DVC-like layout by hand: a cached dir out, an uncached metrics file and its lock entry."""
    files = {"a.jsonl": b'{"a": 1}\n', "sub/b.txt": b"b\n"}
    cache = root / ".dvc/cache/files/md5"
    listing = []
    for rel, data in files.items():
        oid = _md5(data)
        (cache / oid[:2]).mkdir(parents=True, exist_ok=True)
        (cache / oid[:2] / oid[2:]).write_bytes(data)
        listing.append({"md5": oid, "relpath": rel})
    listing_bytes = json.dumps(listing).encode()
    dir_oid = _md5(listing_bytes) + ".dir"
    (cache / dir_oid[:2]).mkdir(parents=True, exist_ok=True)
    (cache / dir_oid[:2] / dir_oid[2:]).write_bytes(listing_bytes)
    metrics, plot = b'{"n": 3}\n', b"step,loss\n1,0.5\n"
    (root / "metrics").mkdir()
    (root / "metrics/s.json").write_bytes(metrics)
    (root / "plots").mkdir()
    (root / "plots/s.csv").write_bytes(plot)
    spec = {
        "stages": {
            "s": {
                "cmd": "true",
                "outs": ["data/out"],
                "metrics": [{"metrics/s.json": {"cache": False}}],
                "plots": [{"plots/s.csv": {"cache": False, "x": "step"}}],
            }
        }
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump(spec))
    lock = {
        "schema": "2.0",
        "stages": {
            "s": {
                "cmd": "true",
                "outs": [
                    {"path": "data/out", "hash": "md5", "md5": dir_oid},
                    {"path": "metrics/s.json", "hash": "md5", "md5": _md5(metrics)},
                    {"path": "plots/s.csv", "hash": "md5", "md5": _md5(plot)},
                ],
            }
        },
    }
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    return files["a.jsonl"], metrics, plot


def test_missing_outputs_come_back_byte_for_byte(tmp_path: Path) -> None:
    a, metrics, plot = _project(tmp_path)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "metrics/s.json"], cwd=tmp_path, check=True)
    subprocess.run(
        ["git", "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qm", "m"], cwd=tmp_path, check=True
    )
    assert keep_uncached_outputs("s", tmp_path)  # what a successful run keeps
    (tmp_path / KEEP_DIR / _md5(metrics)).unlink()  # metrics: only git's HEAD has them now
    (tmp_path / "metrics/s.json").unlink()
    (tmp_path / "plots/s.csv").unlink()  # plots: kept copy
    restored = restore_missing_outputs("s", tmp_path)
    assert sorted(restored) == ["data/out", "metrics/s.json", "plots/s.csv"]
    assert (tmp_path / "data/out/a.jsonl").read_bytes() == a
    assert (tmp_path / "data/out/sub/b.txt").read_bytes() == b"b\n"
    assert (tmp_path / "metrics/s.json").read_bytes() == metrics
    assert (tmp_path / "plots/s.csv").read_bytes() == plot
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["out"]  # no work dir left


def test_present_or_unknown_outputs_are_left_alone(tmp_path: Path) -> None:
    _project(tmp_path)
    (tmp_path / "metrics/s.json").write_text('{"newer": true}\n')  # newer than the lock: kept as is
    (tmp_path / "plots/s.csv").unlink()  # nowhere to restore it from (nothing kept, no git)
    assert restore_missing_outputs("s", tmp_path) == ["data/out"]
    assert (tmp_path / "metrics/s.json").read_text() == '{"newer": true}\n'
    assert not (tmp_path / "plots/s.csv").exists()
    assert restore_missing_outputs("unknown", tmp_path) == []


def test_kept_copies_are_pruned_to_what_the_lock_and_the_last_run_need(tmp_path: Path) -> None:
    _, metrics, _ = _project(tmp_path)
    keep_uncached_outputs("s", tmp_path)
    (tmp_path / "metrics/s.json").write_bytes(b'{"n": 4}\n')
    keep_uncached_outputs("s", tmp_path)
    (tmp_path / "metrics/s.json").write_bytes(b'{"n": 5}\n')
    keep_uncached_outputs("s", tmp_path)
    kept = {p.name for p in (tmp_path / KEEP_DIR).iterdir()}
    assert _md5(metrics) in kept and _md5(b'{"n": 5}\n') in kept and _md5(b'{"n": 4}\n') not in kept
