"""Zero-shot reranking by query likelihood: how probable is the question, given the passage?

Why: the cross-encoder this project can train for itself (``rerank.py``) learns its own pair task
but ranks real questions below plain hybrid search, and no wheel ships a trained cross-encoder
for offline use. A causal LM needs no training for this: shown a candidate passage and asked to
write a question that the passage answers, it assigns the user's actual question a
log-probability, and passages that make the question likely are the ones that answer it
(unsupervised passage reranking, "UPR", Sachan et al. 2022). The bundled SmolLM2-135M-Instruct
does it offline. On the real manuals (README) it lifts file-level MRR@10 from 0.914 (hybrid) to
0.969, at about 5.5 s per question for 30 candidates on 2 CPU cores: a quality setting, not a
latency one (``rag_index.reranker: query_likelihood`` with ``--rerank``).

The score of a candidate is the *mean* log-probability per question token (so the length of
the question does not matter; it is the same for every candidate anyway) of the question after
the chat-formatted passage prompt. Passages are cut to ``max_passage_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, TypeVar

import numpy as np
import torch

from components.errors import MissingInputError

T = TypeVar("T")

PROMPT = "Passage: {passage}\n\nWrite a question that this passage answers."
MAX_PASSAGE_TOKENS = 200
BATCH_SIZE = 8


def mean_logprob(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean log-softmax probability of ``targets`` (K,) under next-token ``logits`` (K, V)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return float(logp.gather(-1, targets.unsqueeze(-1)).mean())


def continuation_logprobs(
    model: Any, rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int
) -> list[float]:
    """Mean log-probability of each row's continuation (its second id list) after its context.

    One left-padded forward pass per call: the continuations end every row, so only the last
    ``max continuation + 1`` positions' logits are computed (``logits_to_keep``; a full
    vocabulary row per position would be ~50k floats). Position ids count real tokens only,
    so a row scores the same alone as in a padded batch.
    """
    from components.evaluation.generate import left_pad

    keep = max(len(q) for _, q in rows) + 1
    ids, mask = left_pad([list(c) + list(q) for c, q in rows], pad_id)
    width = ids.shape[1]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
    scores = []
    for i, (_, cont) in enumerate(rows):
        n = len(cont)
        # logits at position t predict token t + 1: the continuation's n tokens are predicted by
        # the n positions before the last one (the last position predicts past the end)
        scores.append(mean_logprob(logits[i, keep - 1 - n : keep - 1], ids[i, width - n :]))
    return scores


class QueryLikelihoodReranker:
    """Orders candidates by log P(question | passage) under a causal chat LM."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_passage_tokens: int = MAX_PASSAGE_TOKENS,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_passage_tokens = max_passage_tokens
        self.batch_size = batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _context(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_passage_tokens]
        from components.evaluation.generate import chat_prompt_ids

        return list(chat_prompt_ids(self.tokenizer, [PROMPT.format(passage=self.tokenizer.decode(ids))])[0])

    def scores(self, query: str, texts: Sequence[str]) -> np.ndarray:
        """One mean log-probability per text (higher = the passage makes the question likelier)."""
        question = self.tokenizer(query, add_special_tokens=False)["input_ids"]
        rows = [(self._context(t), question) for t in texts]
        out: list[float] = []
        for start in range(0, len(rows), self.batch_size):
            out += continuation_logprobs(self.model, rows[start : start + self.batch_size], self.pad_id)
        return np.asarray(out, dtype=np.float32)

    def rerank(
        self, query: str, items: Sequence[T], text_of: Callable[[T], str], top_k: int | None = None
    ) -> list[tuple[T, float]]:
        """The ``top_k`` items (all when None) with their scores, best first; ties keep input order."""
        from components.rag.rerank import rerank_items

        return rerank_items(self.scores, query, items, text_of, top_k)


@lru_cache(maxsize=2)
def load_query_likelihood(name: str) -> QueryLikelihoodReranker:
    """The reranker over a bundled model (``smollm2-135m-instruct``) or a local causal-LM directory."""
    from components.models.bundled import load_named_lm

    model, tokenizer = load_named_lm(name, "rag_index.ql_model")
    if not tokenizer.chat_template:
        raise MissingInputError(
            f"rag_index.ql_model: {name} has no chat template (the prompt is a chat turn)"
        )
    return QueryLikelihoodReranker(model, tokenizer)
