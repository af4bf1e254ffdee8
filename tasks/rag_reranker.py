"""Stage ``rag_reranker``: fine-tune the bundled MiniLM as a cross-encoder on the index's own chunks.

No offline package ships cross-encoder weights, so the pipeline trains its reranker from the
corpus it indexes (:mod:`components.rag.rerank`): section titles and held-out sentences are the
queries, their chunk the positive, BM25 neighbours the hard negatives. Pairs are split by chunk;
the held-out side is scored before (fresh head) and after training, so the metrics say what the
training bought. The model (safetensors) goes to ``paths.reranker``, which ``posttrain rag
query/ask/eval`` use by default (``rag_index.reranker: trained``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from components.artifacts import atomic_dir, describe_output
from components.config import to_dict
from components.errors import DataError
from components.params import Params
from components.rag.rerank import (
    Passage,
    build_pairs,
    evaluate_pairs,
    load_base_cross_encoder,
    split_pairs,
    train_reranker,
)
from components.rag.store import open_store
from components.tracking import Tracker
from tasks.stage import configure_threads, stage_command

STAGE = "rag_reranker"


def corpus_passages(params: Params) -> list[Passage]:
    """The indexed chunks (reader text, title, section), a seeded sample of at most ``max_passages``."""
    cfg, index = params.rag_reranker, params.rag_index
    with open_store(index.uri, index.collection) as store:
        rows = store.passages()
    passages = [
        Passage(
            chunk_id=r["chunk_id"],
            source=r["source"],
            text=r["context"] or r["text"],
            title=r["section"].split(" > ")[-1] if r["section"] else r["title"],
        )
        for r in rows
    ]
    if len(passages) > cfg.max_passages:
        keep = np.random.default_rng(cfg.seed).choice(len(passages), cfg.max_passages, replace=False)
        passages = [passages[i] for i in sorted(keep)]
    return passages


def run(params: Params, tracker: Tracker) -> dict[str, Any]:
    """Train the reranker and return its held-out metrics (before and after)."""
    cfg = params.rag_reranker
    out = Path(params.paths.reranker)
    if not cfg.enabled:
        with atomic_dir(out) as tmp:
            describe_output(tmp, stage=STAGE, config=to_dict(cfg), seed=cfg.seed, inputs={})
        return {"enabled": False}
    configure_threads()
    passages = corpus_passages(params)
    pairs = build_pairs(
        passages, seed=cfg.seed, queries_per_passage=cfg.queries_per_passage, negatives=cfg.negatives
    )
    train, held_out = split_pairs(pairs, cfg.eval_share, cfg.seed)
    if not train:
        raise DataError(
            f"rag_reranker: the index holds too little text to build training pairs "
            f"({len(passages)} chunks); add documents to {params.rag_index.docs_dir}"
        )
    before = evaluate_pairs(
        load_base_cross_encoder(cfg.base, max_length=cfg.max_length, seed=cfg.seed), held_out
    )
    with atomic_dir(out) as tmp:
        stats = train_reranker(
            train,
            tmp,
            base=cfg.base,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            seed=cfg.seed,
            max_length=cfg.max_length,
            progress=True,
        )
        after = evaluate_pairs(tmp, held_out)
        metrics = {
            "passages": len(passages),
            "train_pairs": len(train),
            "eval_pairs": len(held_out),
            "eval_queries": after["queries"],
            "steps": stats["steps"],
            "train_loss": round(float(stats["train_loss"]), 4),
            "untrained_mrr": round(before["mrr"], 4),
            "trained_mrr": round(after["mrr"], 4),
            "untrained_accuracy_at_1": round(before["accuracy@1"], 4),
            "trained_accuracy_at_1": round(after["accuracy@1"], 4),
        }
        describe_output(
            tmp,
            stage=STAGE,
            config=to_dict(cfg),
            seed=cfg.seed,
            inputs={"index": params.paths.rag},
            metrics=metrics,
        )
    tracker.log_metrics({"train_seconds": float(stats["seconds"])})
    return metrics


main = stage_command(STAGE, run)

if __name__ == "__main__":
    main()
