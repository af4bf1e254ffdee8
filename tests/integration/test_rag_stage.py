"""The ``rag_index`` stage: atomic, self-describing output and metrics (real Milvus Lite, real MiniLM)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from components.errors import DataError, MissingInputError, PosttrainError
from components.params import Params, PathsConfig, RagIndexConfig
from components.rag.store import open_store
from components.tracking import RecordingTracker
from tasks import rag_index

pytestmark = pytest.mark.slow  # loads MiniLM and parses PDFs: ~10-20 s for the module

SHIPPED = Path(__file__).resolve().parents[2] / "data" / "docs"


def _params(tmp: Path, **rag: object) -> Params:
    cfg = {"docs_dir": "docs", "uri": "out/rag/milvus.db", "collection": "stage_docs", **rag}
    return Params(paths=PathsConfig(rag="out/rag", metrics="out/metrics"), rag_index=RagIndexConfig(**cfg))


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project dir with three shipped docs and one corrupt PDF; the stage runs from here."""
    monkeypatch.chdir(tmp_path)
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("travel-guide.md", "trade-report-2025.pdf", "rail-timetable.html"):
        shutil.copy(SHIPPED / name, docs)
    (docs / "scan.pdf").write_bytes(os.urandom(512))
    return tmp_path


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_stage_builds_index_atomically_and_reports(project):
    tracker = RecordingTracker()
    metrics = rag_index.run(_params(project), tracker)

    n_chunks = metrics["n_chunks"]
    assert metrics == {
        "n_documents": 3,
        "n_chunks": n_chunks,
        # the stage builds from scratch: every chunk is new
        "n_unchanged": 0,
        "chunks_added": n_chunks,
        "chunks_updated": 0,
        "chunks_removed": 0,
        "n_pruned_files": 0,
        "n_duplicates": 0,
        "n_quarantined": 0,
        "n_skipped": 1,
        "cleaning": metrics["cleaning"],
        "skipped": [{"source": "docs/scan.pdf", "reason": metrics["skipped"][0]["reason"]}],
        "duplicates": [],
        "quarantined": [],
    }
    assert n_chunks >= 3
    assert set(metrics["cleaning"]) == {"boilerplate", "empty", "headers_footers"}
    assert all(isinstance(v, int) and v >= 0 for v in metrics["cleaning"].values())
    assert "not a valid PDF" in metrics["skipped"][0]["reason"]

    out = project / "out" / "rag"
    assert {"config.yaml", "manifest.json", "metrics.json", "skipped.json", "milvus.db"} == {
        p.name for p in out.iterdir()
    }
    assert _leftovers(out.parent) == []
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert json.loads((out / "skipped.json").read_text()) == metrics["skipped"]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["collection"] == "stage_docs" and sum(config["indexed"].values()) == metrics["n_chunks"]
    # only the build keys describe the output: a query-time key changes nothing on disk
    assert set(config) == set(rag_index.BUILD_KEYS) | {"indexed"}
    assert (config["chunking"], config["chunk_tokens"], config["chunk_overlap_tokens"]) == (
        "by_title",
        128,
        16,
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "rag_index" and "docs_dir" in manifest["inputs"]

    assert "docs/scan.pdf" in tracker.tags["rag_index.skipped"]
    assert tracker.artifacts == [(str(Path("out/rag/skipped.json")), None)]

    # The index at its final path opens (the build's lock was released) and holds every chunk.
    with open_store("out/rag/milvus.db", "stage_docs") as store:
        assert store.count() == metrics["n_chunks"]
        assert store.sources() == [
            "docs/rail-timetable.html",
            "docs/trade-report-2025.pdf",
            "docs/travel-guide.md",
        ]
        hits = store.search("Satipia copper tonnes", None, mode="sparse", top_k=1)
        assert hits[0].source == "docs/trade-report-2025.pdf" and hits[0].page == 1
        assert store.config()["chunking"] == rag_index.chunking_config(RagIndexConfig()).to_dict()
        kept = {s: store.chunk_hashes(s) for s in ("docs/trade-report-2025.pdf", "docs/travel-guide.md")}

    # A rebuild replaces the whole output: same count, no duplicates, no leftovers.
    (project / "docs" / "rail-timetable.html").unlink()
    again = rag_index.run(_params(project), RecordingTracker())
    assert again["n_documents"] == 2
    assert again["chunks_added"] == again["n_chunks"] and again["n_unchanged"] == 0  # rebuilt, not patched
    with open_store("out/rag/milvus.db", "stage_docs") as store:
        assert store.count() == again["n_chunks"] < metrics["n_chunks"]
        # a rebuild gives the same files the same chunk ids and content hashes
        assert {s: store.chunk_hashes(s) for s in kept} == kept
    assert _leftovers(out.parent) == []


def test_failed_build_leaves_previous_index_and_no_temp_dirs(project):
    rag_index.run(_params(project), RecordingTracker())
    before = sorted(p.name for p in (project / "out" / "rag").iterdir())
    for doc in (project / "docs").iterdir():
        doc.unlink()
    (project / "docs" / "scan.pdf").write_bytes(b"not a pdf")
    with pytest.raises(DataError, match="no document could be indexed"):
        rag_index.run(_params(project), RecordingTracker())
    assert sorted(p.name for p in (project / "out" / "rag").iterdir()) == before
    assert _leftovers(project / "out") == []


def test_lite_file_outside_output_dir_is_refused(project):
    with pytest.raises(PosttrainError, match="must be inside paths.rag"):
        rag_index.run(_params(project, uri="elsewhere/milvus.db"), RecordingTracker())
    assert not (project / "out").exists()


def test_missing_docs_dir_is_a_clear_error(project):
    with pytest.raises(MissingInputError, match="rag_index.docs_dir: nowhere"):
        rag_index.run(_params(project, docs_dir="nowhere"), RecordingTracker())


def test_bad_chunking_fails_before_anything_is_parsed_or_written(project):
    # RagIndexConfig built in code skips params.yaml's cross-checks; the stage checks again up front
    with pytest.raises(PosttrainError, match=r"rag_index\.chunk_overlap_tokens must be >= 0 and smaller"):
        rag_index.run(_params(project, chunk_tokens=16, chunk_overlap_tokens=16), RecordingTracker())
    assert not (project / "out").exists()


def test_chunking_config_and_index_options_come_from_rag_index():
    cfg = RagIndexConfig(
        chunking="sentence_window",
        chunk_tokens=64,
        chunk_overlap_tokens=8,
        window_sentences=3,
        index_type="HNSW",
        flat_below=10,
    )
    chunking = rag_index.chunking_config(cfg)
    assert (chunking.method, chunking.chunk_tokens, chunking.overlap_tokens, chunking.window_sentences) == (
        "sentence_window",
        64,
        8,
        3,
    )
    assert rag_index.index_options(cfg) == {"index_type": "HNSW", "flat_below": 10}
    # what dvc.yaml re-runs the stage for: every build key, and no query-time key
    from dataclasses import fields

    names = [f.name for f in fields(RagIndexConfig)]
    assert set(rag_index.BUILD_KEYS) == set(names[: names.index("top_k")])
