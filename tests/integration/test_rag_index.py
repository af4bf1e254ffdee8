"""Ingest the shipped documents into a real Milvus Lite file and search it (real MiniLM, no mocks).

One index is built per module (parse + embed + write takes ~10 s on 2 cores); the tests that
change an index build their own small one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from components.errors import PosttrainError
from components.rag.chunking import ChunkingConfig
from components.rag.embedding import get_embedder
from components.rag.index import RetrievalOptions, ingest, retrieve
from components.rag.store import METADATA_FIELDS, IndexMismatchError, RagStore, StoreLockedError, open_store
from flows import rag_cli

pytestmark = pytest.mark.slow  # the module's index costs ~10-15 s to build

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "data" / "docs"
COLLECTION = "test_docs"


@pytest.fixture(scope="session")
def embedder():
    """MiniLM, loaded once for the whole test session (get_embedder caches per process)."""
    return get_embedder("minilm")


@pytest.fixture(scope="module")
def index(tmp_path_factory, embedder):
    """The shipped docs plus a corrupt PDF and an unsupported file, ingested as ``docs`` (relative)."""
    work = tmp_path_factory.mktemp("rag")
    shutil.copytree(SHIPPED, work / "docs")
    (work / "docs" / "broken.pdf").write_bytes(b"\x00garbage that is not a pdf" * 40)
    (work / "docs" / "sheet.xlsx").write_bytes(b"PK\x03\x04")
    uri = str(work / "index" / "milvus.db")  # the parent dir does not exist yet
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        with open_store(uri, COLLECTION) as store:
            report = ingest(["docs"], store, embedder, chunking=ChunkingConfig("by_title", 128, 16))
            yield {"work": work, "uri": uri, "store": store, "report": report}


def _search(store, embedder, question, mode, top_k):
    return retrieve(store, embedder, question, RetrievalOptions(mode=mode, top_k=top_k))


def test_ingest_reports_documents_chunks_and_skips(index):
    report = index["report"]
    assert report.n_documents == 8
    assert set(report.indexed) == {f"docs/{p.name}" for p in SHIPPED.iterdir()}
    assert report.n_chunks == sum(report.indexed.values()) == index["store"].count()
    assert all(n > 0 for n in report.indexed.values())
    # a first ingest adds every chunk; nothing was there to update, remove or keep
    assert (report.added, report.updated, report.removed) == (report.n_chunks, 0, 0)
    assert report.unchanged == [] and report.pruned == {}
    skipped = {s.source: s.reason for s in report.skipped}
    assert set(skipped) == {"docs/broken.pdf", "docs/sheet.xlsx"}
    assert "not a valid PDF" in skipped["docs/broken.pdf"]
    assert "unsupported file type .xlsx" in skipped["docs/sheet.xlsx"]
    assert index["store"].sources() == sorted(report.indexed)


def test_collection_records_how_it_was_built(index, embedder):
    config = index["store"].config()
    assert config["embedding_model"] == embedder.name == "minilm"
    assert config["dim"] == embedder.dim == 384
    assert config["chunking"] == ChunkingConfig("by_title", 128, 16).to_dict()
    assert config["index_type"] == "FLAT"  # auto: a few dozen rows are far below flat_below


@pytest.mark.parametrize(
    ("mode", "question", "expected"),
    [
        ("dense", "When is the lantern festival held in Rapeba?", "travel-guide.md"),
        ("dense", "When did Peme become the capital of Pufaia?", "history-of-six-capitals.pdf"),
        ("dense", "Which country charges no visa fee?", "embassy-directory.html"),
        ("sparse", "sleeper berths booked 48 hours before departure", "rail-timetable.html"),
        ("sparse", "Topoor currency gilder", "visitor-faq.txt"),
        ("sparse", "record low minus 31 degrees Pezofo", "climate-almanac.docx"),
        ("hybrid", "How many tonnes of copper did Satipia export?", "trade-report-2025.pdf"),
        ("hybrid", "Which stage builds the retrieval index?", "posttrain-pipeline.md"),
        ("hybrid", "Which capital has a monsoon climate?", "climate-almanac.docx"),
    ],
)
def test_search_modes_find_the_document_that_answers(index, embedder, mode, question, expected):
    hits = _search(index["store"], embedder, question, mode, 3)
    assert 1 <= len(hits) <= 3
    assert hits[0].source == f"docs/{expected}"
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert all(h.score > 0 for h in hits)


def test_hits_carry_text_ids_and_pdf_pages(index, embedder):
    hits = _search(index["store"], embedder, "Vapage parliament building Grid Square", "hybrid", 1)
    assert "Vapage" in hits[0].text and hits[0].page == 2
    assert len(hits[0].chunk_id) == 32
    assert hits[0].metadata["page"] == 2 and hits[0].metadata["file_type"] == "pdf"


def test_sparse_mode_needs_no_embedder(index):
    hits = retrieve(index["store"], None, "Satipia copper", RetrievalOptions(mode="sparse", top_k=2))
    assert hits[0].source == "docs/trade-report-2025.pdf"


def test_reingest_replaces_instead_of_duplicating(index, embedder):
    store, work = index["store"], index["work"]
    before = store.count()
    per_source = {s: store.count(s) for s in store.sources()}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        again = ingest(["./docs"], store, embedder)  # another spelling of the same folder
    assert again.n_documents == 8
    assert again.unchanged == sorted(per_source)  # ./docs/x and docs/x are the same document
    assert (again.added, again.updated, again.removed) == (0, 0, 0)
    assert store.count() == before
    assert {s: store.count(s) for s in store.sources()} == per_source


def test_reingesting_a_shorter_file_drops_its_stale_chunks(tmp_path, embedder):
    doc = tmp_path / "notes.md"
    sections = [f"## Section {i}\n\nThe harbour of Kota has {i} cranes and {i} ferries.\n" for i in range(6)]
    doc.write_text("# Notes\n\n" + "\n".join(sections))
    small = ChunkingConfig("by_title", 16, 0)
    with open_store(str(tmp_path / "x.db"), "c") as store:
        first = ingest([doc], store, embedder, chunking=small)
        assert store.count() == first.n_chunks > 2
        doc.write_text("# Notes\n\nOnly one short paragraph about Kota remains.\n")
        second = ingest([doc], store, embedder, chunking=small)
        assert store.count() == second.n_chunks == 1
        # chunk 0 keeps its id with new content; the others are gone
        assert (second.added, second.updated, second.removed) == (0, 1, first.n_chunks - 1)
        hits = _search(store, embedder, "Kota harbour cranes", "hybrid", 5)
        assert [h.text for h in hits] == ["Notes\n\nOnly one short paragraph about Kota remains."]


def test_dimension_mismatch_is_refused(tmp_path, embedder):
    with open_store(str(tmp_path / "x.db"), "c") as store:
        store.ensure_collection(
            {"embedding_model": "minilm", "dim": 8, "chunking": ChunkingConfig().to_dict()}
        )
        with pytest.raises(IndexMismatchError, match=r"was built with dim 8, not 384"):
            ingest([SHIPPED / "visitor-faq.txt"], store, embedder)
        assert store.count() == 0 and store.config()["dim"] == 8  # nothing written, record kept


# -- CLI (in-process through the same handlers flows.cli dispatches to) ------------------------


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = rag_cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def in_work(index, monkeypatch):
    """Run the CLI from the module's work dir: no params.yaml and no trained reranker there."""
    monkeypatch.chdir(index["work"])
    return index


def test_cli_query_json_schema(in_work, capsys):
    index = in_work
    code, out, err = _cli(
        capsys, "query", "How many tonnes of copper did Satipia export?", "--json", "--top-k", "2",
        "--uri", index["uri"], "--collection", COLLECTION,
    )  # fmt: skip
    assert code == 0, err
    payload = json.loads(out)
    assert list(payload) == ["hits"] and len(payload["hits"]) == 2
    for hit in payload["hits"]:
        assert list(hit) == ["source", "score", "text", "chunk_id", "metadata"]
        assert isinstance(hit["score"], float) and isinstance(hit["text"], str)
        assert set(hit["metadata"]) == set(METADATA_FIELDS)
    assert payload["hits"][0]["source"] == "docs/trade-report-2025.pdf"  # as given to ingest
    assert payload["hits"][0]["metadata"]["file_type"] == "pdf"


def test_cli_query_readable(in_work, capsys):
    code, out, _ = _cli(
        capsys, "query", "lantern festival", "--mode", "dense", "-k", "1", "--uri", in_work["uri"],
        "--collection", COLLECTION,
    )  # fmt: skip
    assert code == 0
    assert out.startswith("1. docs/travel-guide.md  score=")
    assert "Lantern Festival" in out


def test_cli_batch_prints_one_json_line_per_question(in_work, capsys, tmp_path):
    batch = tmp_path / "q.jsonl"
    batch.write_text(
        '{"id": "a", "question": "visa fee in Lubaa"}\n\n{"id": 7, "question": "Blue Heron sleeper"}\n'
    )
    code, out, err = _cli(
        capsys, "query", "--batch", str(batch), "--json", "--top-k", "1", "--uri", in_work["uri"],
        "--collection", COLLECTION,
    )  # fmt: skip
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["id"] for line in lines] == ["a", 7]
    assert [len(line["hits"]) for line in lines] == [1, 1]
    assert lines[0]["hits"][0]["source"] == "docs/embassy-directory.html"
    assert set(lines[1]["hits"][0]) == {"source", "score", "text", "chunk_id", "metadata"}


def test_cli_batch_malformed_line_names_file_and_line(in_work, capsys, tmp_path):
    batch = tmp_path / "q.jsonl"
    batch.write_text('{"id": 1, "question": "ok"}\n{"id": 2, "question": \n')
    code, out, err = _cli(
        capsys, "query", "--batch", str(batch), "--uri", in_work["uri"], "--collection", COLLECTION
    )
    assert code == 2 and out == ""
    assert err.startswith("posttrain rag: error: ") and f"{batch}:2:" in err
    assert len(err.strip().splitlines()) == 1


def test_cli_ingest_prints_counts_and_skips_and_replaces(tmp_path, capsys, embedder, monkeypatch):
    monkeypatch.chdir(tmp_path)
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(SHIPPED / "visitor-faq.txt", docs)
    shutil.copy(SHIPPED / "posttrain-pipeline.md", docs)
    (docs / "bad.pdf").write_bytes(b"nope")
    uri = str(tmp_path / "cli" / "m.db")
    args = ["ingest", str(docs), "--uri", uri, "--collection", "c", "--quiet"]
    code, out, err = _cli(capsys, *args)
    assert code == 0, err
    assert out.splitlines()[0].startswith(
        "indexed 2 files (2 new or changed, 0 unchanged) into collection 'c'"
    )
    assert f"  {docs / 'bad.pdf'}: not a valid PDF" in out
    first_total = out.split("now ")[1]
    code, out, _ = _cli(capsys, *args)
    assert code == 0 and out.split("now ")[1] == first_total  # same total: replaced, not added
    assert out.splitlines()[0].startswith("indexed 2 files (0 new or changed, 2 unchanged)")
    assert "chunks +0 added, ~0 updated, -0 removed" in out


def test_cli_missing_collection_is_one_line_error(in_work, capsys):
    uri = in_work["uri"]
    code, out, err = _cli(capsys, "query", "x", "--mode", "sparse", "--uri", uri, "--collection", "nope")
    assert code == 2 and out == ""
    assert err == f"posttrain rag: error: collection 'nope' not found at {uri}; " + (
        "build it with `posttrain rag ingest PATH` or the rag_index stage\n"
    )


def test_second_process_gets_a_one_line_lock_error(index):
    """The module's store holds the Lite file open; another process must fail fast and clearly."""
    proc = subprocess.run(
        [sys.executable, "-m", "flows.rag_cli", "query", "copper", "--mode", "sparse"]
        + ["--uri", index["uri"], "--collection", COLLECTION],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=index["work"],
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("posttrain rag: error: Milvus Lite database")
    assert "lock" in lines[0]


def test_lock_error_type_in_process(tmp_path):
    """Inside one process several stores may share a file; the lock only bites across processes."""
    uri = str(tmp_path / "m.db")
    with open_store(uri, "c") as a, open_store(uri, "c") as b:
        a.ensure_collection({"embedding_model": "minilm", "dim": 4, "chunking": ChunkingConfig().to_dict()})
        assert b.exists() and b.config()["dim"] == 4
    assert issubclass(StoreLockedError, PosttrainError)
    store = RagStore(uri, "c")
    store.close()
    store.close()  # closing twice is harmless


def test_repeated_texts_are_embedded_once_and_get_the_same_vectors(embedder, monkeypatch):
    texts = ["Trains to Kope leave hourly.", "The museum opens at nine.", "Trains to Kope leave hourly."]
    fresh = get_embedder.__wrapped__("minilm")  # an uncached embedder: nothing seen yet
    calls: list[list[str]] = []
    encode = fresh.model.encode
    monkeypatch.setattr(
        fresh.model, "encode", lambda batch, **kw: calls.append(list(batch)) or encode(batch, **kw)
    )
    first = fresh.encode(texts)
    assert calls == [texts[:2]]  # the repeat inside one call is embedded once
    np.testing.assert_array_equal(first[0], first[2])
    again = fresh.encode([texts[1], "A new sentence about ferries."])
    assert calls[1:] == [["A new sentence about ferries."]]  # only the unseen text reaches the model
    np.testing.assert_array_equal(again[0], first[1])
    uncached = fresh.encode(texts[:2], cache=False)  # ingest's path: always the model
    assert calls[2:] == [texts[:2]]
    np.testing.assert_allclose(uncached, first[:2], atol=1e-6)
    alone = embedder.encode(["The museum opens at nine."], cache=False)[0]
    np.testing.assert_allclose(alone, first[1], atol=1e-5)  # batching does not change a vector
