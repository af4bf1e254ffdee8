"""Retrieval quality on documents no one here wrote: Debian's installed manuals, as a new user would.

The corpus is what Debian's doc packages install under ``/usr/share/doc`` (libffi's HTML manual,
base-passwd's HTML page, and the bzip2, fontconfig, shared-mime-info and libtasn1 PDF manuals);
the 48 questions in ``benchmarks/rag_real_docs/questions.jsonl`` are paraphrased (no four
consecutive words copied from the documents). The run does what the pipeline does with
``rag_index.docs_dir`` pointed at that corpus, with the shipped ``params.yaml`` settings:

1. ``ingest`` the corpus into a fresh Milvus Lite index;
2. train the reranker on that index (the ``rag_reranker`` stage's code, ``train_on_index``);
3. ``posttrain rag eval`` (:func:`components.rag.service.evaluate`): per-mode file-level metrics,
   once with the trained cross-encoder as the reranker and once with query-likelihood reranking
   (``rag_index.reranker: query_likelihood``; ``--no-ql`` skips it).

Usage: ``python -m benchmarks.rag_real_docs [--work DIR]``; writes ``results.json`` and
``results.md`` next to the questions (the README's table comes from ``results.md``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent / "rag_real_docs"
ROOT = Path(__file__).resolve().parents[1]
DOC = Path("/usr/share/doc")
SOURCES: dict[str, Path] = {
    "base-passwd/users-and-groups.html": DOC / "base-passwd/users-and-groups.html",
    "bzip2-manual.pdf": DOC / "bzip2/manual.pdf.gz",
    "fontconfig-user.pdf": DOC / "fontconfig/fontconfig-user.pdf.gz",
    "shared-mime-info-spec.pdf": DOC / "shared-mime-info/shared-mime-info-spec.pdf",
    "libtasn1.pdf": DOC / "libtasn1-doc/libtasn1.pdf",
}
LIBFFI = DOC / "libffi8/html"


def build_corpus(corpus: Path) -> int:
    """Copy (and gunzip) the manuals into ``corpus``; returns the number of files."""
    if corpus.exists():
        shutil.rmtree(corpus)
    (corpus / "libffi").mkdir(parents=True)
    missing = [str(p) for p in [*SOURCES.values(), LIBFFI] if not p.exists()]
    if missing:
        raise SystemExit(f"missing Debian docs (install the doc packages): {', '.join(missing)}")
    for page in sorted(LIBFFI.glob("*.html")):
        shutil.copy(page, corpus / "libffi" / page.name)
    for name, src in SOURCES.items():
        dest = corpus / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.suffix == ".gz":
            with gzip.open(src, "rb") as fin, open(dest, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        else:
            shutil.copy(src, dest)
    return sum(1 for p in corpus.rglob("*") if p.is_file())


def table(report: dict, seconds: dict[str, float], ingest: dict, reranker: dict) -> str:
    cols = ("recall_at_1", "recall_at_5", "recall_at_10", "mrr_at_10", "ndcg_at_10")
    head = "| mode | " + " | ".join(c.replace("_at_", "@") for c in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for name, scores in report["modes"].items():
        mark = " (default)" if name == report["default_mode"] else ""
        lines.append(f"| {name}{mark} | " + " | ".join(f"{scores[c]:.3f}" for c in cols) + " |")
    answers = report.get("answers", {})
    lines += [
        "",
        f"{report['n_questions']} paraphrased questions over {ingest['n_documents']} files "
        f"({ingest['n_chunks']} chunks, {ingest['n_duplicates']} duplicate chunks dropped, "
        f"{ingest['n_skipped']} skipped). Ingest {seconds['ingest']:.0f} s, reranker training "
        f"{seconds['reranker']:.0f} s ({reranker['train_pairs']} pairs; held-out pair MRR "
        f"{reranker['untrained_mrr']:.3f} untrained -> {reranker['trained_mrr']:.3f}), "
        f"eval {seconds['eval']:.0f} s on 2 CPU cores.",
    ]
    if "eval_ql" in seconds:
        lines.append(
            "hybrid_rerank reranks with the trained cross-encoder, hybrid_rerank_ql by query likelihood "
            f"(log P(question | passage) under the bundled SmolLM2-135M-Instruct, no training): "
            f"its evaluation took {seconds['eval_ql']:.0f} s."
        )
    if answers:
        lines.append(
            f"Extractive answers contain the expected string for {answers['answer_containment']:.3f} of the "
            f"questions; the retrieved evidence does for {answers['evidence_containment']:.3f}; "
            f"refused {answers['refusal_rate']:.3f}."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", default="/tmp/posttrain-real-docs", help="scratch directory")
    parser.add_argument(
        "--multi-query",
        metavar="MODEL",
        help="also score hybrid + multi-query expansion, rewriting with this generator "
        "(e.g. smollm2-135m-instruct)",
    )
    parser.add_argument(
        "--no-ql",
        action="store_true",
        help="skip the hybrid_rerank_ql row (query-likelihood reranking with rag_index.ql_model, "
        "about 9 s per question on 2 CPU cores)",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep the index and reranker already in --work (and the ingest/reranker figures of the "
        "last results.json); only re-run the evaluation",
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from components.params import load_params
    from components.rag.embedding import get_embedder
    from components.rag.evaluation import read_questions
    from components.rag.query_likelihood import load_query_likelihood
    from components.rag.rerank import get_reranker
    from components.rag.service import evaluate, load_generator, make_rewriter
    from components.rag.store import open_store
    from tasks.rag_index import ingest_with_config
    from tasks.rag_reranker import train_on_index

    params = load_params(ROOT / "params.yaml")
    cfg = params.rag_index
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    questions = read_questions(str(HERE / "questions.jsonl"))
    n_files = build_corpus(work / "corpus")
    print(f"corpus: {n_files} files in {work / 'corpus'}", file=sys.stderr)
    os.chdir(work)  # sources are recorded as corpus/..., as the questions name them
    previous = json.loads((HERE / "results.json").read_text()) if args.reuse else {}
    if not args.reuse:
        shutil.rmtree("index", ignore_errors=True)
        shutil.rmtree("reranker", ignore_errors=True)
    embedder = get_embedder(cfg.embedding_model)
    rewriter = None
    if args.multi_query:
        generate, _ = load_generator(args.multi_query)
        rewriter = make_rewriter(generate, cfg.expansion_queries)
    seconds: dict[str, float] = dict(previous.get("seconds", {}))
    with open_store("index/milvus.db", cfg.collection) as store:
        if args.reuse:
            ingest_metrics, reranker_metrics = previous["ingest"], previous["reranker"]
        else:
            t = time.perf_counter()
            ingest_metrics = ingest_with_config(cfg, ["corpus"], store, embedder, progress=True).metrics()
            seconds["ingest"] = time.perf_counter() - t
            t = time.perf_counter()
            reranker_metrics = train_on_index(store, params.rag_reranker, Path("reranker"))
            seconds["reranker"] = time.perf_counter() - t
        t = time.perf_counter()
        result = evaluate(
            questions,
            store,
            embedder,
            cfg,
            reranker=get_reranker("reranker"),
            progress=True,
            rewriter=rewriter,
        )
        seconds["eval"] = time.perf_counter() - t
        if not args.no_ql:  # the same evaluation with the zero-shot LM reranker in the rerank row
            t = time.perf_counter()
            ql = evaluate(
                questions,
                store,
                embedder,
                cfg,
                reranker=load_query_likelihood(cfg.ql_model),
                progress=True,
            )
            result["modes"]["hybrid_rerank_ql"] = ql["modes"]["hybrid_rerank"]
            for qid, rows in ql["per_question"].items():
                result["per_question"][qid] += [
                    {**row, "mode": "hybrid_rerank_ql"} for row in rows if row["mode"] == "hybrid_rerank"
                ]
            seconds["eval_ql"] = time.perf_counter() - t
    (HERE / "results.json").write_text(
        json.dumps(
            {
                "ingest": {k: v for k, v in ingest_metrics.items() if not isinstance(v, list)},
                "reranker": reranker_metrics,
                "seconds": seconds,
                **{k: v for k, v in result.items() if k != "per_question"},
                "per_question": result["per_question"],
            },
            indent=2,
        )
        + "\n"
    )
    md = table(result, seconds, ingest_metrics, reranker_metrics)
    (HERE / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
