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
from components.params import Params, RagRerankerConfig
from components.rag.rerank import (
    Passage,
    build_pairs,
    evaluate_pairs,
    load_base_cross_encoder,
    split_pairs,
    train_reranker,
)
from components.rag.store import RagStore, open_store
from components.tracking import Tracker
from tasks.stage import configure_threads, stage_command

STAGE = "rag_reranker"


def corpus_passages(store: RagStore, max_passages: int, seed: int) -> list[Passage]:
    """The indexed chunks (reader text, section heading), a seeded sample of at most ``max_passages``."""
    passages = [
        Passage(
            chunk_id=r["chunk_id"],
            source=r["source"],
            text=r["context"] or r["text"],
            title=r["section"].split(" > ")[-1] if r["section"] else r["title"],
        )
        for r in store.passages()
    ]
    if len(passages) > max_passages:
        keep = np.random.default_rng(seed).choice(len(passages), max_passages, replace=False)
        passages = [passages[i] for i in sorted(keep)]
    return passages


def train_on_index(
    store: RagStore, cfg: RagRerankerConfig, out: Path, progress: bool = True
) -> dict[str, Any]:
    """Build pairs from ``store``'s chunks, score the fresh head, train, save to ``out``, score again.

    ``out`` is written in place (the stage passes its temp dir); returns the metrics.
    """
    passages = corpus_passages(store, cfg.max_passages, cfg.seed)
    pairs = build_pairs(
        passages, seed=cfg.seed, queries_per_passage=cfg.queries_per_passage, negatives=cfg.negatives
    )
    train, held_out = split_pairs(pairs, cfg.eval_share, cfg.seed)
    if not train:
        raise DataError(
            f"rag_reranker: the index holds too little text to build training pairs ({len(passages)} chunks)"
        )
    before = evaluate_pairs(
        load_base_cross_encoder(cfg.base, max_length=cfg.max_length, seed=cfg.seed), held_out
    )
    stats = train_reranker(
        train,
        out,
        base=cfg.base,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        seed=cfg.seed,
        max_length=cfg.max_length,
        progress=progress,
    )
    after = evaluate_pairs(out, held_out)
    return {
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
        "seconds": float(stats["seconds"]),
    }


def run(params: Params, tracker: Tracker) -> dict[str, Any]:
    """Train the reranker on the index's chunks and return its held-out metrics (before and after)."""
    cfg = params.rag_reranker
    out = Path(params.paths.reranker)
    if not cfg.enabled:
        with atomic_dir(out) as tmp:
            describe_output(tmp, stage=STAGE, config=to_dict(cfg), seed=cfg.seed, inputs={})
        return {"enabled": False}
    configure_threads()
    with atomic_dir(out) as tmp:
        with open_store(params.rag_index.uri, params.rag_index.collection) as store:
            metrics = train_on_index(store, cfg, tmp)
        seconds = metrics.pop("seconds")  # timings stay out of the output's bytes
        describe_output(
            tmp,
            stage=STAGE,
            config=to_dict(cfg),
            seed=cfg.seed,
            inputs={"index": params.paths.rag},
            metrics=metrics,
        )
    tracker.log_metrics({"train_seconds": seconds})
    return metrics


main = stage_command(STAGE, run)

if __name__ == "__main__":
    main()
