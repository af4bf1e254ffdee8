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

    assert metrics == {
        "n_documents": 3,
        "n_chunks": metrics["n_chunks"],
        "n_skipped": 1,
        "skipped": [{"source": "docs/scan.pdf", "reason": metrics["skipped"][0]["reason"]}],
    }
    assert metrics["n_chunks"] >= 3
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

    # A rebuild replaces the whole output: same count, no duplicates, no leftovers.
    (project / "docs" / "rail-timetable.html").unlink()
    again = rag_index.run(_params(project), RecordingTracker())
    assert again["n_documents"] == 2
    with open_store("out/rag/milvus.db", "stage_docs") as store:
        assert store.count() == again["n_chunks"] < metrics["n_chunks"]
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
