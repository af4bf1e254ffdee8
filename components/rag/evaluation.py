"""Retrieval metrics at file level, and the question-set format of ``posttrain rag eval``.

A question set is JSON lines ``{"id", "question", "relevant": [source paths], "answer": optional}``.
Hits are reduced to their files in rank order (a file's first hit counts; later hits of the same
file are not a second answer), then, with ``relevant`` as the set of right files:

- recall@k: the share of relevant files among the first k files (with one relevant file: hit@k);
- MRR@10: 1 / rank of the first relevant file within the first 10, else 0;
- nDCG@10: binary gains discounted by log2(rank + 1), over the ideal ordering.

A relevant path matches a hit's source when they are equal after normalisation or one ends with
the other at a path boundary, so ``docs/a.pdf`` in a question file matches ``data/docs/a.pdf``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from components.errors import DataError, MissingInputError

RECALL_AT: tuple[int, ...] = (1, 5, 10)
CUTOFF = 10


@dataclass(frozen=True)
class Question:
    id: Any
    question: str
    relevant: tuple[str, ...]
    answer: str | None = None


def id_and_question(record: dict[str, Any], where: str) -> tuple[Any, str]:
    """A question line's ``id`` and ``question`` (also the shape of ``rag query --batch`` lines)."""
    if "id" not in record:
        raise DataError(f'{where}: missing "id"')
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f'{where}: "question" must be a non-empty string')
    return record["id"], question


def read_questions(path: str) -> list[Question]:
    """Parse a question file; a bad line names the file and line (nothing is evaluated then)."""
    from components.data.jsonl import parse_jsonl_lines

    if not os.path.isfile(path):
        raise MissingInputError(f"{path}: no such question file")
    out: list[Question] = []
    with open(path, "rb") as fh:  # bytes: a bad byte is "FILE:LINE: not valid UTF-8", not a traceback
        for number, record in parse_jsonl_lines(fh, path):
            where = f"{path}:{number}"
            qid, question = id_and_question(record, where)
            relevant = record.get("relevant")
            if (
                not isinstance(relevant, list)
                or not relevant
                or not all(isinstance(r, str) for r in relevant)
            ):
                raise DataError(f'{where}: "relevant" must be a non-empty list of source paths')
            answer = record.get("answer")
            if answer is not None and not isinstance(answer, str):
                raise DataError(f'{where}: "answer" must be a string when given')
            out.append(Question(qid, question, tuple(relevant), answer))
    if not out:
        raise DataError(f"{path}: no questions")
    return out


def same_source(a: str, b: str) -> bool:
    a, b = os.path.normpath(a), os.path.normpath(b)
    if a == b:
        return True
    longer, shorter = (a, b) if len(a) > len(b) else (b, a)
    return longer.endswith(os.sep + shorter)


def ranked_files(sources: Iterable[str]) -> list[str]:
    """Hit sources reduced to distinct files, in the order of their first hit."""
    seen: list[str] = []
    for s in sources:
        if s not in seen:
            seen.append(s)
    return seen


def score_ranking(files: Sequence[str], relevant: Sequence[str]) -> dict[str, float]:
    """recall@1/5/10, mrr@10 and ndcg@10 of one ranked file list.

    Each relevant path counts once: the first file that matches it is a hit, so a path that
    two indexed files match (``v1/guide.md``, ``v2/guide.md``) cannot push a metric above 1.
    """
    found: set[int] = set()
    hits: list[bool] = []
    for f in files[:CUTOFF]:
        match = next((i for i, r in enumerate(relevant) if i not in found and same_source(f, r)), None)
        if match is not None:
            found.add(match)
        hits.append(match is not None)
    n_rel = len(relevant)
    out = {f"recall_at_{k}": sum(hits[:k]) / n_rel for k in RECALL_AT}
    first = next((i for i, h in enumerate(hits) if h), None)
    out["mrr_at_10"] = 0.0 if first is None else 1.0 / (first + 1)
    dcg = sum(1.0 / math.log2(i + 2) for i, h in enumerate(hits) if h)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(n_rel, CUTOFF)))
    out["ndcg_at_10"] = dcg / ideal if ideal else 0.0
    return out


def mean_scores(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    keys = rows[0].keys() if rows else []
    return {k: round(sum(r[k] for r in rows) / len(rows), 4) for k in keys}


def contains_answer(text: str, answer: str) -> bool:
    """Answer containment: the expected answer appears in the text (case and spacing ignored)."""
    return " ".join(answer.lower().split()) in " ".join(text.lower().split())
