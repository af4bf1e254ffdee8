"""The index over time: incremental re-ingest, prune, metadata and filters, refusals, the alias swap.

Real unstructured, MiniLM and Milvus Lite. One template index (four shipped documents in
``docs/`` and a note in ``notes/``) is built once per module; every test that changes an index
works on its own copy (a Milvus Lite database is a directory: copying a closed one is a
millisecond), so no test depends on another's order.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from components.rag import index as rag_index_module
from components.rag.chunking import ChunkingConfig
from components.rag.embedding import get_embedder
from components.rag.index import RetrievalOptions, index_record, ingest, retrieve
from components.rag.store import METADATA_FIELDS, IndexMismatchError, open_store
from flows import rag_cli

pytestmark = pytest.mark.slow  # the template index costs ~10 s (MiniLM load + 5 documents)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "data" / "docs"
COLLECTION = "incremental"
DOCS = ("embassy-directory.html", "trade-report-2025.pdf", "travel-guide.md", "visitor-faq.txt")
KOTA = (
    "# Harbour of Kota\n\nThe harbour of Kota has twelve cranes and handles grain ships from March "
    "to October.\n\n## Ferries\n\nFerries to the island of Mib leave the harbour every two hours.\n"
)
ALL_SOURCES = sorted([f"docs/{n}" for n in DOCS] + ["notes/kota.md"])
ROW_FIELDS = ["chunk_id", "source", "text", "context", *METADATA_FIELDS, "file_hash"]


@pytest.fixture(scope="module")
def embedder():
    return get_embedder("minilm")


@pytest.fixture(scope="module")
def template(tmp_path_factory, embedder):
    """``docs/`` (4 shipped files) and ``notes/kota.md``, indexed with the default chunking; closed."""
    root = tmp_path_factory.mktemp("incremental")
    (root / "docs").mkdir()
    for name in DOCS:
        shutil.copy2(SHIPPED / name, root / "docs" / name)
    (root / "notes").mkdir()
    (root / "notes" / "kota.md").write_text(KOTA)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        with open_store("idx/m.db", COLLECTION) as store:
            report = ingest(["docs", "notes"], store, embedder)
            snapshot = rows(store)
    return SimpleNamespace(root=root, report=report, rows=snapshot)


@pytest.fixture
def project(template, tmp_path, monkeypatch):
    """A private copy of the template (files keep their mtimes), cwd inside it, its store open."""
    for name in ("docs", "notes", "idx"):
        shutil.copytree(template.root / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    with open_store("idx/m.db", COLLECTION) as store:
        yield SimpleNamespace(root=tmp_path, store=store, uri=str(tmp_path / "idx" / "m.db"))


def rows(store) -> dict[str, dict]:
    """Every row of the collection by chunk id, with its metadata and file hash."""
    store.count()  # loads the collection (a reopened one starts released)
    found = store.client.query(
        store.collection, filter='chunk_id != ""', output_fields=ROW_FIELDS, limit=16384
    )
    return {r["chunk_id"]: {k: r[k] for k in ROW_FIELDS} for r in found}


def of(snapshot: dict[str, dict], source: str) -> dict[str, dict]:
    return {k: v for k, v in snapshot.items() if v["source"] == source}


def without(snapshot: dict[str, dict], source: str) -> dict[str, dict]:
    return {k: v for k, v in snapshot.items() if v["source"] != source}


class Spy:
    """Records the calls made through one attribute while still making them."""

    def __init__(self, monkeypatch, owner, name):
        self.calls: list[tuple] = []
        real = getattr(owner, name)

        def spy(*args, **kwargs):
            self.calls.append(args)
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, spy)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = rag_cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- incremental ingest ------------------------------------------------------------------------


def test_first_ingest_indexes_every_file(template):
    report = template.report
    assert sorted(report.indexed) == ALL_SOURCES
    assert report.added == report.n_chunks == len(template.rows) and report.updated == report.removed == 0
    assert report.unchanged == [] and report.skipped == [] and report.pruned == {}
    assert {r["source"] for r in template.rows.values()} == set(ALL_SOURCES)


def test_reingesting_an_unchanged_folder_parses_and_writes_nothing(project, template, embedder, monkeypatch):
    store = project.store
    for source in ALL_SOURCES:  # a newer mtime with the same bytes is not a change
        os.utime(source, (os.stat(source).st_atime, os.stat(source).st_mtime + 3600))
    parsed = Spy(monkeypatch, rag_index_module, "parse_documents")
    written = Spy(monkeypatch, store, "replace_source")
    deleted = Spy(monkeypatch, store, "delete_source")

    report = ingest(["docs", "notes"], store, embedder)

    assert report.unchanged == ALL_SOURCES
    assert (report.added, report.updated, report.removed) == (0, 0, 0)
    assert report.indexed == template.report.indexed and report.n_chunks == len(template.rows)
    assert report.pruned == {} and report.skipped == [] and report.quarantined == []
    assert parsed.calls == [] and written.calls == [] and deleted.calls == []
    assert rows(store) == template.rows  # same ids, hashes and even the old modified times


def test_editing_one_file_rewrites_only_that_files_rows(project, template, embedder, monkeypatch):
    store, faq = project.store, "docs/visitor-faq.txt"
    text = Path(faq).read_text()
    assert "uses the gilder" in text
    Path(faq).write_text(text.replace("uses the gilder", "uses the florin"))
    parsed = Spy(monkeypatch, rag_index_module, "parse_documents")

    report = ingest(["docs", "notes"], store, embedder)

    assert parsed.calls == [(["docs/visitor-faq.txt"], ("eng",))]  # only the edited file was parsed
    assert report.unchanged == [s for s in ALL_SOURCES if s != faq]
    after = rows(store)
    # every other file's rows are untouched: same ids, text, hashes and modified time
    assert without(after, faq) == without(template.rows, faq)
    before_faq, after_faq = of(template.rows, faq), of(after, faq)
    assert report.indexed[faq] == len(after_faq) == store.count(faq)
    added = sum(1 for k in after_faq if k not in before_faq)
    updated = sum(
        1
        for k, v in after_faq.items()
        if k in before_faq and v["content_hash"] != before_faq[k]["content_hash"]
    )
    removed = sum(1 for k in before_faq if k not in after_faq)
    assert (report.added, report.updated, report.removed) == (added, updated, removed)
    assert updated >= 1
    # unchanged chunks of the edited file keep their row; the changed one carries the new text
    assert any(
        v["content_hash"] == before_faq[k]["content_hash"] for k, v in after_faq.items() if k in before_faq
    )
    assert all(v["file_hash"] != next(iter(before_faq.values()))["file_hash"] for v in after_faq.values())
    assert all(v["modified"] == int(os.stat(faq).st_mtime) for v in after_faq.values())
    assert not any("gilder" in v["text"] for v in after_faq.values())
    hits = retrieve(store, None, "florin currency", RetrievalOptions(mode="sparse", top_k=1))
    assert hits[0].source == faq and "uses the florin" in hits[0].text


def test_a_deleted_file_is_pruned_only_when_asked_and_only_under_the_given_paths(project, template, embedder):
    store, gone = project.store, "docs/embassy-directory.html"
    n = store.count(gone)
    assert n > 0
    Path(gone).unlink()

    kept = ingest(["docs", "notes"], store, embedder)
    assert kept.pruned == {} and kept.removed == 0
    assert store.count(gone) == n  # without --prune a missing file's chunks stay
    assert gone not in kept.indexed

    pruned = ingest(["docs"], store, embedder, prune=True)
    assert pruned.pruned == {gone: n}
    assert pruned.removed == n and pruned.added == pruned.updated == 0
    assert store.count(gone) == 0
    # notes/ was not named: its file is not pruned although it is not under docs/
    assert rows(store) == without(template.rows, gone)
    assert store.sources() == [s for s in ALL_SOURCES if s != gone]


def test_cli_ingest_prune_reports_the_pruned_file(project, capsys):
    gone = "docs/trade-report-2025.pdf"
    n = project.store.count(gone)
    before = project.store.count()
    Path(gone).unlink()
    code, out, err = cli(
        capsys, "ingest", "docs", "--prune", "--quiet", "--uri", project.uri, "--collection", COLLECTION
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(
        "indexed 3 files (0 new or changed, 3 unchanged) into collection 'incremental'"
    )
    assert f"chunks +0 added, ~0 updated, -{n} removed (now {before - n} chunks in total)" in lines[0]
    assert f"pruned {gone}: {n} chunks removed (file no longer exists)" in lines
    assert project.store.count(gone) == 0 and project.store.count() == before - n


def test_cli_ingest_json_report(project, capsys):
    Path("docs/travel-guide.md").write_text(
        Path("docs/travel-guide.md").read_text() + "\nA new closing line.\n"
    )
    Path("notes/kota.md").unlink()
    code, out, err = cli(
        capsys,
        "ingest",
        "docs",
        "notes",
        "--prune",
        "--json",
        "--quiet",
        "--uri",
        project.uri,
        "--collection",
        COLLECTION,
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["pruned"] == {"notes/kota.md": 2}  # one chunk per heading
    assert report["n_unchanged"] == 3 and report["n_pruned_files"] == 1 and report["n_documents"] == 4
    assert report["chunks_removed"] >= 1 and report["chunks_added"] + report["chunks_updated"] >= 1
    assert report["total"] == project.store.count() == sum(report["indexed"].values())
    assert sorted(report["indexed"]) == [f"docs/{n}" for n in DOCS]


def test_a_file_that_stops_parsing_keeps_its_indexed_rows(project, template, embedder):
    faq = "docs/visitor-faq.txt"
    Path(faq).write_bytes(b"")  # emptied by a bad upload
    report = ingest(["docs", "notes"], project.store, embedder, prune=True)
    assert [(s.source, s.reason) for s in report.skipped] == [
        (faq, "no text extracted: the file is empty or has no readable content")
    ]
    assert rows(project.store) == template.rows  # the good content is not erased


def test_duplicates_in_one_batch_are_dropped_and_reported(tmp_path, embedder, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("a").mkdir()
    shutil.copy(SHIPPED / "visitor-faq.txt", "a/faq.txt")
    shutil.copy(SHIPPED / "visitor-faq.txt", "a/faq-copy.txt")  # sorted first: the copy is kept
    with open_store("m.db", "c") as store:
        report = ingest(["a"], store, embedder)
        assert list(report.indexed) == ["a/faq-copy.txt"]
        assert [(s.source, s.reason) for s in report.skipped] == [
            ("a/faq.txt", "duplicate of already indexed text")
        ]
        assert len(report.duplicates) == report.indexed["a/faq-copy.txt"]
        assert {d["duplicate_of"].split("#")[0] for d in report.duplicates} == {"a/faq-copy.txt"}
        assert store.sources() == ["a/faq-copy.txt"]


def test_a_copy_of_an_already_indexed_file_is_a_duplicate(project, embedder):
    shutil.copy("docs/visitor-faq.txt", "notes/faq-copy.txt")
    report = ingest(["docs", "notes"], project.store, embedder)
    assert "notes/faq-copy.txt" not in report.indexed
    assert project.store.count("notes/faq-copy.txt") == 0


# -- metadata and filters ----------------------------------------------------------------------


def test_hits_carry_title_section_page_type_time_and_hash(project, template, embedder):
    store = project.store
    every = RetrievalOptions(top_k=len(template.rows))
    hits = retrieve(store, embedder, "copper exports of Satipia in tonnes", every)
    assert len(hits) == len(template.rows) and {h.source for h in hits} == set(ALL_SOURCES)
    hashes = {s: store.chunk_hashes(s) for s in ALL_SOURCES}
    titles = {
        "docs/embassy-directory.html": "Directory of embassies and visa offices",
        "docs/trade-report-2025.pdf": "Annual Trade Report 2025",
        "docs/travel-guide.md": "A Traveller's Guide to Eight Capitals",
        "docs/visitor-faq.txt": "visitor-faq",  # no heading in a .txt: the file name stands in
        "notes/kota.md": "Harbour of Kota",
    }
    for hit in hits:
        meta = hit.metadata
        assert set(meta) == set(METADATA_FIELDS)
        assert meta == hit.to_json()["metadata"]
        assert meta["title"] == titles[hit.source]
        assert meta["file_type"] == Path(hit.source).suffix.lstrip(".")
        assert meta["modified"] == int(os.stat(hit.source).st_mtime)
        assert meta["content_hash"] == hashes[hit.source][hit.chunk_id]
        assert meta["page"] == hit.page
        if meta["file_type"] == "pdf":
            assert meta["page"] in (1, 2)
        else:
            assert meta["page"] == 0
    # a chunk that opens with a heading carries it as its section (and the PDF page it is on)
    tea = next(
        h for h in hits if h.text.startswith("Sereveand\n\nSereveand shipped 12,300 tonnes of black tea")
    )
    assert (tea.metadata["section"], tea.page) == ("Sereveand", 1)
    gofaor = next(h for h in hits if h.text.startswith("Gofaor\n\nThe capital of Gofaor is Dare."))
    assert gofaor.metadata["section"] == "Gofaor"
    ferries = retrieve(store, None, "ferries to Mib", RetrievalOptions(mode="sparse", top_k=1))[0]
    assert ferries.source == "notes/kota.md" and ferries.metadata["title"] == "Harbour of Kota"


def test_cli_filter_returns_only_matching_files(project, capsys):
    common = ["--json", "-k", "10", "--no-rerank", "--uri", project.uri, "--collection", COLLECTION]
    code, out, err = cli(capsys, "query", "capital city exports", *common)
    assert code == 0, err
    unfiltered = json.loads(out)["hits"]
    assert {h["metadata"]["file_type"] for h in unfiltered} > {"pdf"}  # the filter has work to do
    code, out, err = cli(capsys, "query", "capital city exports", "--filter", 'file_type == "pdf"', *common)
    assert code == 0, err
    hits = json.loads(out)["hits"]
    assert len(hits) == project.store.count("docs/trade-report-2025.pdf")  # every PDF chunk, nothing else
    assert {h["source"] for h in hits} == {"docs/trade-report-2025.pdf"}
    assert all(h["metadata"]["file_type"] == "pdf" and h["metadata"]["page"] > 0 for h in hits)
    code, out, err = cli(
        capsys,
        "query",
        "capital",
        "--mode",
        "sparse",
        "--filter",
        'file_type == "pdf" and page == 2',
        *common,
    )
    assert code == 0, err
    assert {h["metadata"]["page"] for h in json.loads(out)["hits"]} == {2}


@pytest.mark.parametrize(
    ("expr", "mode", "problem"),
    [
        ('file_type = = "pdf"', "hybrid", "unexpected character '='"),
        ('colour == "red"', "sparse", "unknown field 'colour'"),
        ("page >", "dense", "unexpected end of expression"),
    ],
)
def test_a_bad_filter_is_a_one_line_error_and_loses_nothing(project, template, capsys, expr, mode, problem):
    code, out, err = cli(
        capsys, "query", "copper", "--filter", expr, "--mode", mode, "--no-rerank",
        "--uri", project.uri, "--collection", COLLECTION,
    )  # fmt: skip
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"posttrain rag: error: invalid --filter {expr!r}: ")
    assert problem in lines[0] and "fields: source, chunk_id, title, section, page, file_type" in lines[0]
    assert rows(project.store) == template.rows


def test_a_bad_filter_fails_before_any_model_is_loaded(project, capsys, monkeypatch):
    loaded = Spy(monkeypatch, rag_cli, "_load_embedder")
    code, out, err = cli(
        capsys, "query", "copper", "--filter", "colour == 1", "--uri", project.uri, "--collection", COLLECTION
    )
    assert code == 2 and out == ""
    assert err.splitlines() == [err.splitlines()[-1]] and "unknown field 'colour'" in err
    assert loaded.calls == []


# -- refusals --------------------------------------------------------------------------------


def test_a_collection_built_with_another_embedding_model_is_refused(tmp_path, embedder, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = str(tmp_path / "other.db")
    record = {"embedding_model": "e5-small", "dim": embedder.dim, "chunking": ChunkingConfig().to_dict()}
    with open_store(uri, "c") as store:
        store.recreate(record)
        with pytest.raises(IndexMismatchError) as exc:
            store.check_compatible(index_record(embedder, ChunkingConfig()))
        assert "'e5-small'" in str(exc.value) and "'minilm'" in str(exc.value)
        with pytest.raises(IndexMismatchError, match=r"embedding_model 'e5-small', not 'minilm'"):
            ingest([SHIPPED / "visitor-faq.txt"], store, embedder)
        assert store.count() == 0 and store.config()["embedding_model"] == "e5-small"
    for command in ("query", "ask"):
        code, out, err = cli(
            capsys, command, "Which currency?", "--no-rerank", "--uri", uri, "--collection", "c"
        )
        assert code == 2 and out == ""
        assert err.startswith("posttrain rag: error: collection 'c' at ") and len(err.splitlines()) == 1
        assert "built with embedding_model 'e5-small', not 'minilm'" in err


def test_ingesting_with_another_chunking_is_refused(project, template, embedder):
    with pytest.raises(IndexMismatchError, match="was built with chunking"):
        ingest(["docs"], project.store, embedder, chunking=ChunkingConfig("fixed", 64, 8))
    assert rows(project.store) == template.rows


def test_empty_folder_is_exit_1_and_changes_nothing(project, template, capsys):
    Path("empty").mkdir()
    for extra in ([], ["--prune"]):
        code, out, err = cli(
            capsys, "ingest", "empty", "--quiet", *extra, "--uri", project.uri, "--collection", COLLECTION
        )
        assert code == 1 and out == ""
        assert err == (
            "posttrain rag: no supported files under empty (supported: .docx, .htm, .html, .markdown, .md, "
            ".pdf, .txt); the index was not changed\n"
        )
        assert rows(project.store) == template.rows


def test_corrupt_and_empty_files_are_skipped_with_reasons(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("in").mkdir()
    Path("in/kota.md").write_text(KOTA)
    Path("in/scan.pdf").write_bytes(bytes(range(256)) * 8)  # binary, no %PDF header
    Path("in/empty.docx").write_bytes(b"")
    code, out, err = cli(capsys, "ingest", "in", "--json", "--quiet", "--uri", "m.db", "--collection", "c")
    assert code == 0, err
    report = json.loads(out)
    assert report["indexed"] == {"in/kota.md": 2} and report["total"] == 2
    assert report["skipped"] == [
        {
            "source": "in/empty.docx",
            "reason": "not a valid DOCX (not a zip archive): corrupt or mislabelled file",
        },
        {"source": "in/scan.pdf", "reason": "not a valid PDF (no %PDF header): corrupt or mislabelled file"},
    ]


def test_rerank_without_a_trained_reranker(project, capsys):
    common = ["--mode", "sparse", "--uri", project.uri, "--collection", COLLECTION]
    code, out, err = cli(capsys, "query", "ferries", "--rerank", *common)
    assert code == 2 and out == ""
    assert err == (
        "posttrain rag: error: no reranker at models/reranker; train it with `posttrain run` (stage "
        "rag_reranker) or set rag_index.reranker to a CrossEncoder directory\n"
    )
    code, out, err = cli(
        capsys, "query", "ferries", "--mode", "hybrid", "--uri", project.uri, "--collection", COLLECTION
    )
    assert code == 0 and out.startswith("1. notes/kota.md")
    assert err == ""  # rag_index.rerank is off by default: no reranker is looked for


def test_an_unimplemented_expansion_is_not_silently_ignored(project, embedder):
    with pytest.raises(Exception, match="multi_query"):
        retrieve(project.store, embedder, "ferries", RetrievalOptions(expansion="multi_query"))


# -- index types and the alias swap (server mode, exercised on a Lite file) --------------------


def test_hnsw_index_is_built_and_searched(tmp_path, embedder, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("kota.md").write_text(KOTA)
    with open_store("m.db", "c") as store:
        ingest(["kota.md"], store, embedder, index_options={"index_type": "HNSW"})
        assert store.index_type() == "HNSW" and store.config()["index_type"] == "HNSW"
        for mode in ("dense", "hybrid"):
            hits = retrieve(
                store, embedder, "How many cranes in the harbour?", RetrievalOptions(mode=mode, top_k=1)
            )
            assert hits[0].source == "kota.md"


def test_build_behind_alias_swaps_slots_and_drops_the_old_one(tmp_path, embedder, monkeypatch):
    from components.params import RagIndexConfig
    from tasks.rag_index import build_behind_alias

    monkeypatch.chdir(tmp_path)
    Path("docs").mkdir()
    Path("docs/kota.md").write_text(KOTA)
    uri = str(tmp_path / "server.db")
    cfg = RagIndexConfig(docs_dir="docs", uri=uri, collection="live")
    with open_store(uri, "live") as store:  # an index built before aliases: a plain collection
        store.recreate(index_record(embedder, ChunkingConfig()))

    def state():
        with open_store(uri, "live") as store:
            client = store.client
            target = client.describe_alias("live")["collection_name"]
            return target, sorted(client.list_collections()), store.count(), store.sources()

    first = build_behind_alias(cfg, uri)
    assert state() == ("live__a", ["live__a"], first.n_chunks, ["docs/kota.md"])

    shutil.copy(SHIPPED / "visitor-faq.txt", "docs/visitor-faq.txt")
    second = build_behind_alias(cfg, uri)
    assert state() == ("live__b", ["live__b"], second.n_chunks, ["docs/kota.md", "docs/visitor-faq.txt"])
    assert second.n_chunks > first.n_chunks
    with open_store(uri, "live") as store:  # readers search through the alias name
        hits = retrieve(store, embedder, "Which currency is used in Topoor?", RetrievalOptions(top_k=1))
        assert hits[0].source == "docs/visitor-faq.txt"
        assert store.config()["embedding_model"] == "minilm"

    Path("docs/kota.md").unlink()
    third = build_behind_alias(cfg, uri)
    assert state() == ("live__a", ["live__a"], third.n_chunks, ["docs/visitor-faq.txt"])
