"""RAG benchmarks, ours vs bare sentence-transformers + pymilvus doing the same work, side by side.

- ``rag_ingest``: pages/s and chunks/s of :func:`components.rag.index.ingest` (hash, parse, clean,
  chunk, dedupe, embed, write) vs bare ``partition`` + ``chunk_by_title`` + ``SentenceTransformer.encode``
  + ``MilvusClient.insert`` on the same files; and a re-ingest of the unchanged folder (ours skips it).
- ``rag_latency``: end-to-end query latency p50/p95 (embed + hybrid search; + rerank) vs bare
  encode + ``hybrid_search``.
- ``rag_100k``: search latency of the store itself at 100,000 synthetic chunks (HNSW), dense and
  hybrid, ours vs bare ``MilvusClient.search``/``hybrid_search``; the target is p50 <= 20 ms.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ms = np.asarray(samples) * 1000.0
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95))


def _latencies(fn: Callable[[str], object], questions: list[str], rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        for q in questions:
            t = time.perf_counter()
            fn(q)
            out.append(time.perf_counter() - t)
    return out


def _pages(files: list[str]) -> int:
    """Pages of the corpus: a PDF's pages, one per other file."""
    from pypdf import PdfReader

    return sum(len(PdfReader(f).pages) if f.endswith(".pdf") else 1 for f in files)


def bench_rag_ingest(repeats: int, docs: str | None = None) -> list[str]:
    from pymilvus import DataType, MilvusClient
    from unstructured.chunking.title import chunk_by_title
    from unstructured.partition.auto import partition

    from components.rag.embedding import get_embedder
    from components.rag.index import ingest
    from components.rag.parsing import CONTENT_TYPES, collect_files
    from components.rag.store import open_store

    folder = docs or str(ROOT / "data/docs")
    files, _ = collect_files([folder])
    pages = _pages(files)
    embedder = get_embedder("minilm")
    results: dict[str, list[float]] = {"ours": [], "reingest": [], "bare": []}
    chunks = {"ours": 0, "bare": 0}
    for r in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            with open_store(str(Path(tmp) / "ours.db"), "bench") as store:
                report = ingest([folder], store, embedder)
                results["ours"].append(time.perf_counter() - t)
                chunks["ours"] = report.n_chunks
                t = time.perf_counter()
                ingest([folder], store, embedder)
                results["reingest"].append(time.perf_counter() - t)

            t = time.perf_counter()
            client = MilvusClient(str(Path(tmp) / "bare.db"))
            schema = MilvusClient.create_schema(auto_id=True)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("text", DataType.VARCHAR, max_length=65535)
            schema.add_field("dense", DataType.FLOAT_VECTOR, dim=embedder.dim)
            index = client.prepare_index_params()
            index.add_index("dense", index_type="FLAT", metric_type="COSINE")
            client.create_collection("bench", schema=schema, index_params=index)
            texts = []
            for f in files:
                elements = partition(
                    filename=f, content_type=CONTENT_TYPES[Path(f).suffix.lower()], languages=["eng"]
                )
                texts += [c.text for c in chunk_by_title(elements, max_characters=640) if c.text.strip()]
            vectors = embedder.model.encode(texts, normalize_embeddings=True, batch_size=32)
            client.insert(
                "bench", [{"text": t_, "dense": v.tolist()} for t_, v in zip(texts, vectors, strict=True)]
            )
            client.close()
            results["bare"].append(time.perf_counter() - t)
            chunks["bare"] = len(texts)
        del r
    med = {k: float(np.median(v)) for k, v in results.items()}
    return [
        f"### RAG ingest: {len(files)} files, {pages} pages ({Path(folder).name}), Milvus Lite, "
        "MiniLM on CPU",
        "",
        "| implementation | seconds (median) | pages/s | chunks/s | ratio to bare |",
        "|---|---|---|---|---|",
        f"| ours: `ingest` (hash, parse, clean, chunk, dedupe, embed with headers, metadata rows) | "
        f"{med['ours']:.2f} | {pages / med['ours']:.1f} | {chunks['ours'] / med['ours']:.1f} | "
        f"{med['ours'] / med['bare']:.2f}x |",
        f"| ours: re-ingest of the unchanged folder | {med['reingest']:.2f} | - | - | "
        f"{med['reingest'] / med['bare']:.2f}x |",
        f"| bare: `partition` + `chunk_by_title` + `encode` + `insert` | {med['bare']:.2f} | "
        f"{pages / med['bare']:.1f} | {chunks['bare'] / med['bare']:.1f} | 1.00x |",
        "",
        f"Chunks: ours {chunks['ours']}, bare {chunks['bare']} (bare has no token cap, no dedupe). "
        "The re-ingest hashes the files and writes nothing.",
        "",
    ]


def bench_rag_latency(repeats: int) -> list[str]:
    from pymilvus import AnnSearchRequest, RRFRanker

    from components.rag.embedding import get_embedder
    from components.rag.evaluation import read_questions
    from components.rag.index import RetrievalOptions, ingest, retrieve
    from components.rag.rerank import get_reranker
    from components.rag.store import open_store

    questions = [q.question for q in read_questions(str(ROOT / "data/rag_eval/questions.jsonl"))]
    embedder = get_embedder("minilm")
    reranker_dir = ROOT / "models/reranker"
    reranker = get_reranker(reranker_dir) if (reranker_dir / "config.json").is_file() else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp, open_store(str(Path(tmp) / "b.db"), "bench") as store:
        ingest([str(ROOT / "data/docs")], store, embedder)
        client = store.client
        opts = RetrievalOptions(top_k=5)

        def ours(q: str) -> object:
            return retrieve(store, embedder, q, opts)

        def bare(q: str) -> object:
            vec = embedder.model.encode([q], normalize_embeddings=True)[0].tolist()
            reqs = [
                AnnSearchRequest(data=[vec], anns_field="dense", param={"metric_type": "COSINE"}, limit=10),
                AnnSearchRequest(data=[q], anns_field="sparse", param={"metric_type": "BM25"}, limit=10),
            ]
            return client.hybrid_search("bench", reqs, RRFRanker(60), limit=5, output_fields=["chunk_id"])

        for f in (ours, bare):
            f(questions[0])  # warm
        bare_p = _percentiles(_latencies(bare, questions, repeats))
        ours_p = _percentiles(_latencies(ours, questions, repeats))
        rows.append(("ours: `retrieve` hybrid (embed + `hybrid_search`, typed hits + metadata)", ours_p))
        if reranker is not None:
            rr = RetrievalOptions(top_k=5, candidates=50)
            rows.append(
                (
                    "ours: hybrid, 50 candidates reranked by the trained cross-encoder",
                    _percentiles(
                        _latencies(
                            lambda q: retrieve(store, embedder, q, rr, reranker=reranker), questions, 1
                        )
                    ),
                )
            )
        rows.append(("bare: `encode` + `MilvusClient.hybrid_search` + `RRFRanker(60)`", bare_p))
    lines = [
        f"### RAG query latency: {len(questions)} questions x {repeats}, shipped docs, Milvus Lite, CPU",
        "",
        "| implementation | p50 ms | p95 ms | p50 ratio to bare |",
        "|---|---|---|---|",
    ]
    for name, (p50, p95) in rows:
        lines.append(f"| {name} | {p50:.1f} | {p95:.1f} | {p50 / bare_p[0]:.2f}x |")
    return [*lines, ""]


ROWS_100K = (
    ("ours: `RagStore.search` dense", "ours_dense", "bare_dense"),
    ("bare: `MilvusClient.search` dense", "bare_dense", "bare_dense"),
    ("ours: `RagStore.search` hybrid (RRF)", "ours_hybrid", "bare_hybrid"),
    ("bare: `MilvusClient.hybrid_search`", "bare_hybrid", "bare_hybrid"),
)


def _row(label: str, mine: tuple[float, float], bare: tuple[float, float]) -> str:
    return f"| {label} | {mine[0]:.1f} | {mine[1]:.1f} | {mine[0] / bare[0]:.2f}x |"


def bench_rag_100k(repeats: int, n_chunks: int = 100_000, n_sources: int = 100) -> list[str]:
    from pymilvus import AnnSearchRequest, RRFRanker

    from components.rag.chunking import Chunk, make_chunk_id
    from components.rag.store import open_store

    rng = np.random.default_rng(0)
    dim = 384
    vocab = [f"w{i}" for i in range(5000)]
    per = n_chunks // n_sources
    queries = [" ".join(rng.choice(vocab, 6)) for _ in range(50)]
    qvecs = rng.standard_normal((len(queries), dim)).astype(np.float32)
    qvecs /= np.linalg.norm(qvecs, axis=1, keepdims=True)
    with tempfile.TemporaryDirectory() as tmp, open_store(str(Path(tmp) / "big.db"), "big") as store:
        record = {"embedding_model": "synthetic", "dim": dim, "chunking": {}, "index_type": "auto"}
        t = time.perf_counter()
        store.recreate(record, expected_rows=n_chunks)
        # Bulk load with plain inserts: the build is not what is measured here (ingest is
        # above); per-source replace (upsert + delete) at this size costs minutes on Lite.
        client = store.client
        for start in range(0, n_chunks, 2000):
            n = min(2000, n_chunks - start)
            vecs = rng.standard_normal((n, dim)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            rows = []
            for j, v in enumerate(vecs.tolist()):
                i = start + j
                source = f"doc{i // per:03d}.txt"
                chunk = Chunk(make_chunk_id(source, i), source, i, " ".join(rng.choice(vocab, 40)), 0)
                rows.append(
                    {
                        "chunk_id": chunk.chunk_id,
                        "source": source,
                        "text": chunk.text,
                        "context": "",
                        "title": "",
                        "section": "",
                        "page": 0,
                        "file_type": "txt",
                        "modified": 0,
                        "content_hash": chunk.content_hash,
                        "file_hash": "0" * 64,
                        "dense": v,
                    }
                )
            client.insert("big", rows)
        # Seal and index what was inserted, as a reopened index is: searching 100k rows that are
        # still in growing segments took 3 s (dense) to 9 s (hybrid) per query on Lite.
        client.flush("big")
        client.release_collection("big")
        client.load_collection("big")
        assert store.count() == n_chunks
        build = time.perf_counter() - t
        pairs = list(zip(queries, qvecs, strict=True))
        it = iter(range(10**9))

        def pick() -> tuple[str, np.ndarray]:
            return pairs[next(it) % len(pairs)]

        def ours_dense(_: str) -> object:
            q, v = pick()
            return store.search(q, v, mode="dense", top_k=10)

        def bare_dense(_: str) -> object:
            q, v = pick()
            return client.search(
                "big",
                data=[v.tolist()],
                anns_field="dense",
                limit=10,
                output_fields=["chunk_id", "text"],
                search_params={"metric_type": "COSINE", "params": {"ef": 64}},
            )

        def ours_hybrid(_: str) -> object:
            q, v = pick()
            return store.search(q, v, mode="hybrid", top_k=10)

        def bare_hybrid(_: str) -> object:
            q, v = pick()
            reqs = [
                AnnSearchRequest(
                    data=[v.tolist()],
                    anns_field="dense",
                    param={"metric_type": "COSINE", "params": {"ef": 64}},
                    limit=20,
                ),
                AnnSearchRequest(data=[q], anns_field="sparse", param={"metric_type": "BM25"}, limit=20),
            ]
            return client.hybrid_search(
                "big", reqs, RRFRanker(60), limit=10, output_fields=["chunk_id", "text"]
            )

        for f in (ours_dense, bare_dense, ours_hybrid, bare_hybrid):
            f("")
        n = 100 * repeats
        res = {
            name: _percentiles(_latencies(f, [""] * n, 1))
            for name, f in (
                ("ours_dense", ours_dense),
                ("bare_dense", bare_dense),
                ("ours_hybrid", ours_hybrid),
                ("bare_hybrid", bare_hybrid),
            )
        }
        index_type = store.index_type()
    small = n_chunks // 10
    small_p50 = _bare_dense_p50(small, dim, n)
    return [
        f"### Search at {n_chunks:,} chunks (synthetic, {dim}-dim, {index_type}), Milvus Lite, "
        f"top 10, {n} queries",
        "",
        f"Built in {build:.0f} s (insert, flush, index, load). Query vectors are given: this is the "
        "search itself.",
        "",
        "| search | p50 ms | p95 ms | p50 ratio to bare |",
        "|---|---|---|---|",
        *(_row(label, res[ours], res[bare]) for label, ours, bare in ROWS_100K),
        "",
        f"Scaling: a bare dense search over {small:,} rows (HNSW, sealed) takes {small_p50:.1f} ms "
        f"p50, {res['bare_dense'][0] / small_p50:.1f}x less than over {n_chunks:,}: Milvus Lite's "
        "search time grows with the row count whatever index is declared (it scans), so the p50 "
        "<= 20 ms target needs a Milvus server at this size, not a better client.",
        "",
    ]


def _bare_dense_p50(n_rows: int, dim: int, n_queries: int) -> float:
    """p50 ms of a bare dense search over ``n_rows`` random vectors (HNSW index, sealed, loaded)."""
    from pymilvus import DataType, MilvusClient

    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        client = MilvusClient(str(Path(tmp) / "small.db"))
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("dense", DataType.FLOAT_VECTOR, dim=dim)
        index = client.prepare_index_params()
        index.add_index(
            "dense", index_type="HNSW", metric_type="COSINE", params={"M": 16, "efConstruction": 200}
        )
        client.create_collection("small", schema=schema, index_params=index)
        vecs = rng.standard_normal((n_rows, dim)).astype(np.float32)
        client.insert("small", [{"id": i, "dense": v} for i, v in enumerate(vecs.tolist())])
        client.flush("small")
        client.release_collection("small")
        client.load_collection("small")
        query = rng.standard_normal(dim).astype(np.float32).tolist()
        params = {"metric_type": "COSINE", "params": {"ef": 64}}

        def bare(_: str) -> object:
            return client.search("small", data=[query], anns_field="dense", limit=10, search_params=params)

        bare("")
        p50 = _percentiles(_latencies(bare, [""] * n_queries, 1))[0]
        client.close()
    return p50
