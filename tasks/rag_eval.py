"""Stage ``rag_eval``: retrieval quality of the index per mode on the shipped question set.

Runs ``posttrain rag eval`` (:func:`components.rag.service.evaluate`) on ``rag_eval.questions``
against the ``rag_index`` output, with ``rag_index.reranker`` (the ``rag_reranker`` model when
it exists, or query-likelihood reranking with the bundled ``ql_model``): file-level
recall@1/5/10, MRR@10 and nDCG@10 for dense, sparse, hybrid, hybrid + PRF and hybrid + rerank
(and hybrid + multi-query when ``rag_index.expansion: multi_query``), and answer containment
of the extractive answers. ``metrics/rag_eval.json`` holds the per-mode table (DVC compares it
across commits); the per-question ranks go to ``plots/rag_eval.csv``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from components.artifacts import write_text_atomic
from components.config import ConfigError, to_dict
from components.params import Params
from components.rag import service
from components.rag.embedding import get_embedder
from components.rag.evaluation import read_questions
from components.rag.store import open_store
from components.tracking import Tracker
from tasks.stage import configure_threads, stage_command

STAGE = "rag_eval"
PER_QUESTION_CSV = "rag_eval.csv"
QUERY_KEYS = (
    "top_k",
    "mode",
    "fusion",
    "rrf_k",
    "dense_weight",
    "expansion",
    "expansion_queries",
    "generator",
    "reranker",
    "ql_model",
    "candidates",
    "min_support",
)


def per_question_csv(report: dict[str, Any]) -> str:
    """One row per (question, mode): the rank metrics and the first three files retrieved."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "mode", "recall_at_1", "mrr_at_10", "ndcg_at_10", "top_files"])
    for qid, rows in report["per_question"].items():
        for row in rows:
            writer.writerow(
                [
                    qid,
                    row["mode"],
                    row["recall_at_1"],
                    round(row["mrr_at_10"], 4),
                    round(row["ndcg_at_10"], 4),
                    " | ".join(row["top_files"]),
                ]
            )
    return buf.getvalue()


def run(params: Params, tracker: Tracker) -> dict[str, Any]:
    """Score the index on the question set; the metrics are the per-mode table."""
    configure_threads()
    cfg = params.rag_index
    questions = read_questions(params.rag_eval.questions)
    embedder = get_embedder(cfg.embedding_model)
    # the hybrid + rerank row is measured whenever the trained reranker exists; rag_index.rerank
    # only decides whether it is the default
    reranker = service.find_reranker(cfg, params.paths.reranker)
    rewriter = None
    if cfg.expansion == "multi_query":
        if cfg.generator == "champion":  # the registry is not a file DVC can list as a dependency
            raise ConfigError(
                "rag_index.generator: the rag_eval stage rewrites questions with a bundled model or a "
                "model directory, not the registry's champion (set it to smollm2-135m-instruct or a "
                "path; `posttrain rag eval --expansion multi_query` can use the champion)"
            )
        generate, _ = service.load_generator(cfg.generator)
        rewriter = service.make_rewriter(generate, cfg.expansion_queries)
    with open_store(cfg.uri, cfg.collection) as store:
        store.check_compatible({"embedding_model": embedder.name, "dim": embedder.dim})
        report = service.evaluate(
            questions, store, embedder, cfg, reranker=reranker, progress=True, rewriter=rewriter
        )
    write_text_atomic(Path(params.paths.plots) / PER_QUESTION_CSV, per_question_csv(report))
    tracker.log_params({f"rag_index.{k}": v for k, v in to_dict(cfg).items() if k in QUERY_KEYS})
    return {k: v for k, v in report.items() if k != "per_question"}


main = stage_command(STAGE, run)

if __name__ == "__main__":
    main()
