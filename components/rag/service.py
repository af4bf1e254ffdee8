"""What ``posttrain rag query/ask/eval`` and the ``rag_eval`` stage share: config -> answers.

The CLI and the stage both turn ``rag_index`` settings into retrieval options, find the
reranker, answer questions and score a question set through these functions, so "the best
configuration is the default" means the same thing everywhere.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from components.errors import MissingInputError, PosttrainError
from components.params import RagIndexConfig
from components.rag.answer import Answer, Evidence, extractive_answer, generative_answer
from components.rag.evaluation import (
    Question,
    contains_answer,
    mean_scores,
    ranked_files,
    score_ranking,
)
from components.rag.index import RetrievalOptions, Rewriter, retrieve
from components.rag.store import RagStore

MAX_QUESTION_CHARACTERS = 2000
EVAL_DEPTH = 10  # file-level metrics look at the first 10 files
GENERATION_TOKENS = 96


def retrieval_options(cfg: RagIndexConfig, **overrides: Any) -> RetrievalOptions:
    """``rag_index``'s query-time keys as :class:`RetrievalOptions`; None overrides are ignored."""
    opts = RetrievalOptions(
        mode=cfg.mode,
        top_k=cfg.top_k,
        fusion=cfg.fusion,
        rrf_k=cfg.rrf_k,
        dense_weight=cfg.dense_weight,
        expansion=cfg.expansion,
        candidates=cfg.candidates,
    )
    return replace(opts, **{k: v for k, v in overrides.items() if v is not None})


def check_question(question: str) -> str:
    """A question is 1..2000 characters of text: a pasted document is not a question."""
    question = (question or "").strip()
    if not question:
        raise PosttrainError("the question is empty")
    if len(question) > MAX_QUESTION_CHARACTERS:
        raise PosttrainError(
            f"the question is {len(question):,} characters long; at most {MAX_QUESTION_CHARACTERS:,} "
            "(ask about a document instead of pasting it: ingest it with `posttrain rag ingest`)"
        )
    return question


def reranker_path(cfg: RagIndexConfig, trained_dir: str | Path) -> Path | None:
    """Where the reranker is: the rag_reranker stage's output, a configured directory, or none."""
    if cfg.reranker == "none":
        return None
    return Path(trained_dir) if cfg.reranker == "trained" else Path(cfg.reranker).expanduser()


def load_reranker(cfg: RagIndexConfig, trained_dir: str | Path, wanted: bool | None) -> Any:
    """The cross-encoder, or None. ``wanted``: True (--rerank) requires one, False disables it.

    ``None`` means ``rag_index.rerank``: when that is on, the reranker is used if it exists
    (a missing trained one only warns, so queries work before the rag_reranker stage ran).
    """
    if wanted is None and not cfg.rerank:
        return None
    return find_reranker(cfg, trained_dir, required=bool(wanted))


def find_reranker(
    cfg: RagIndexConfig, trained_dir: str | Path, required: bool = False, warn: bool = True
) -> Any:
    """The configured reranker if it exists (an error when ``required``), else None.

    ``query_likelihood`` needs no training: it loads ``rag_index.ql_model`` (bundled or a
    directory, which must exist). The others are CrossEncoder directories.
    """
    if cfg.reranker == "query_likelihood":
        from components.rag.query_likelihood import load_query_likelihood

        return load_query_likelihood(cfg.ql_model)
    path = reranker_path(cfg, trained_dir)
    if path is None:
        if required:
            raise PosttrainError("--rerank needs a reranker, but rag_index.reranker is 'none'")
        return None
    if not (path / "config.json").is_file():
        message = (
            f"no reranker at {path}; train it with `posttrain run` (stage rag_reranker) "
            "or set rag_index.reranker to a CrossEncoder directory"
        )
        if required:
            raise MissingInputError(message)
        if warn:
            print(f"posttrain rag: warning: {message}; searching without reranking", file=sys.stderr)
        return None
    from components.rag.rerank import get_reranker

    return get_reranker(path)


# -- answering -----------------------------------------------------------------------------


def load_generator(name: str) -> tuple[Callable[[list[dict[str, str]]], str], Any]:
    """A chat generator from a bundled name (``smollm2-135m-instruct``) or a local directory.

    (``champion``, the registered policy, is loaded from MLflow by the CLI, which then calls
    :func:`make_generator`: components never talk to the tracking server.)
    """
    from components.models.bundled import load_named_lm

    model, tokenizer = load_named_lm(name, "rag_index.generator", also="'champion'")
    return make_generator(model, tokenizer)


def make_generator(model: Any, tokenizer: Any) -> tuple[Callable[[list[dict[str, str]]], str], Any]:
    """(messages -> text, text -> token count) for a causal LM; greedy, so an answer is repeatable."""
    import torch

    model.eval()

    def generate(messages: list[dict[str, str]]) -> str:
        if tokenizer.chat_template:
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            prompt = "\n\n".join(m["content"] for m in messages) + "\n\nAnswer:"
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(
                **ids,
                max_new_tokens=GENERATION_TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
        return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return generate, count_tokens


# -- multi-query expansion -------------------------------------------------------------------

REWRITE_PROMPT = (
    "Write {n} different search queries that would find the documentation answering the question "
    "below. Use other words than the question does. One query per line, nothing else.\n\n"
    "Question: {question}"
)
_LIST_MARKER = re.compile(r"^\s*(?:[-*•]+|\(?\d{1,2}[.):]|[Qq]uery\s*\d*\s*:)\s*")


def parse_rewrites(text: str, question: str, n: int) -> list[str]:
    """Up to ``n`` distinct queries from a generator's reply: one per line, list markers and quotes
    stripped, the question itself and lines over 300 characters (rambling, not a query) dropped."""
    seen = {question.strip().casefold()}
    out: list[str] = []
    for line in text.splitlines():
        query = _LIST_MARKER.sub("", line).strip().strip("\"'“”`").strip()
        if len(query) < 3 or len(query) > 300 or query.casefold() in seen:
            continue
        seen.add(query.casefold())
        out.append(query)
        if len(out) == n:
            break
    return out


HYPOTHETICAL_PROMPT = (
    "Write a short passage from a manual that answers this question.\n\nQuestion: {question}"
)


def hypothetical_passage(text: str, question: str) -> str:
    """The generator's answer passage as one search query (HyDE): whitespace joined, at most 600
    characters; empty when it only repeats the question."""
    passage = " ".join(text.split())[:600]
    return "" if passage.casefold().strip(" ?.") == question.casefold().strip(" ?.") else passage


def make_rewriter(generate: Callable[[list[dict[str, str]]], str], n: int) -> Rewriter:
    """``rag_index.expansion: multi_query``'s rewriter: ``n`` other wordings, plus one hypothetical answer.

    The hypothetical answer (HyDE, Gao et al. 2022) is a passage the generator writes as if it
    were the document: it need not be true, only worded like the corpus, which is why it helps
    even when the generator is too small to paraphrase (SmolLM2-135M mostly repeats the question
    when asked for rewrites, and those repeats are dropped).
    """

    def rewrite(question: str) -> list[str]:
        reply = generate([{"role": "user", "content": REWRITE_PROMPT.format(n=n, question=question)}])
        queries = parse_rewrites(reply, question, n)
        answer = generate([{"role": "user", "content": HYPOTHETICAL_PROMPT.format(question=question)}])
        passage = hypothetical_passage(answer, question)
        return [*queries, passage] if passage and passage not in queries else queries

    return rewrite


def answer(
    question: str,
    store: RagStore,
    embedder: Any,
    options: RetrievalOptions,
    *,
    reranker: Any = None,
    mode: str = "extractive",
    min_support: float = 0.45,
    generator: tuple[Callable[[list[dict[str, str]]], str], Any] | None = None,
    context_tokens: int = 768,
    rewriter: Rewriter | None = None,
) -> tuple[Answer, list[Any]]:
    """Retrieve evidence for ``question`` and answer from it; returns the answer and the hits."""
    question = check_question(question)
    hits = retrieve(store, embedder, question, options, reranker=reranker, rewriter=rewriter)
    evidence = [Evidence.from_hit(h) for h in hits]
    embed = embedder.encode
    if mode == "generative":
        if generator is None:
            raise ValueError("generative answers need a generator")
        generate, count_tokens = generator
        result = generative_answer(
            question,
            evidence,
            generate,
            count_tokens,
            budget_tokens=context_tokens,
            embed=embed,
            min_support=min_support,
        )
    else:
        result = extractive_answer(question, evidence, embed, min_support=min_support)
    return result, hits


# -- evaluation ----------------------------------------------------------------------------


def eval_modes(reranker: Any, rewriter: Rewriter | None = None) -> list[tuple[str, dict[str, Any], bool]]:
    """(name, option overrides, rerank) per evaluated configuration."""
    modes = [("dense", {"mode": "dense"}, False), ("sparse", {"mode": "sparse"}, False)]
    modes += [
        ("hybrid", {"mode": "hybrid"}, False),
        ("hybrid_prf", {"mode": "hybrid", "expansion": "prf"}, False),
    ]
    if rewriter is not None:
        modes.append(("hybrid_multi_query", {"mode": "hybrid", "expansion": "multi_query"}, False))
    if reranker is not None:
        modes.append(("hybrid_rerank", {"mode": "hybrid"}, True))
    return modes


def evaluate(
    questions: Sequence[Question],
    store: RagStore,
    embedder: Any,
    cfg: RagIndexConfig,
    *,
    reranker: Any = None,
    progress: bool = False,
    rewriter: Rewriter | None = None,
) -> dict[str, Any]:
    """File-level recall@1/5/10, MRR@10 and nDCG@10 per mode, plus answer containment.

    Each mode retrieves enough chunks to fill ten distinct files. Answer containment (where
    questions carry an ``answer``) uses the default configuration and the extractive answerer:
    did the answer, and did the retrieved evidence, contain the expected string.
    """
    from tqdm.auto import tqdm

    base = retrieval_options(cfg, expansion="none")
    vectors = embedder.encode([q.question for q in questions])
    results: dict[str, Any] = {"n_questions": len(questions), "modes": {}}
    per_question: dict[str, list[dict[str, Any]]] = {}
    if rewriter is not None:  # the multi_query row and the answers ask once per question, not twice
        rewriter = functools.cache(rewriter)
    configs = eval_modes(reranker, rewriter)
    bar = tqdm(total=len(configs) * len(questions), desc="rag eval", unit="q", disable=not progress)
    for name, overrides, rerank in configs:
        opts = replace(base, **overrides, top_k=max(EVAL_DEPTH * 3, base.top_k))
        rows = []
        for q, vector in zip(questions, vectors, strict=True):
            hits = retrieve(
                store, embedder, q.question, opts,
                reranker=reranker if rerank else None, vector=vector, rewriter=rewriter,
            )  # fmt: skip
            files = ranked_files(h.source for h in hits)
            scores = score_ranking(files, q.relevant)
            rows.append(scores)
            per_question.setdefault(str(q.id), []).append({"mode": name, "top_files": files[:3], **scores})
            bar.update()
        results["modes"][name] = mean_scores(rows)
    bar.close()
    default = cfg.mode
    if cfg.mode == "hybrid" and cfg.expansion in ("prf", "multi_query"):
        default = f"hybrid_{cfg.expansion}"
    if cfg.mode == "hybrid" and cfg.rerank and "hybrid_rerank" in results["modes"]:
        default = "hybrid_rerank"
    results["default_mode"] = default
    results["default"] = results["modes"].get(default, {})
    with_answers = [q for q in questions if q.answer]
    if with_answers:
        answered = evidence_hit = refused = 0
        opts = retrieval_options(cfg)
        default_reranker = reranker if cfg.rerank else None  # answers use the default configuration
        for q in with_answers:
            result, hits = answer(
                q.question, store, embedder, opts, reranker=default_reranker, min_support=cfg.min_support,
                rewriter=rewriter,
            )  # fmt: skip
            answered += contains_answer(result.answer, q.answer or "")
            evidence_hit += any(contains_answer(h.text, q.answer or "") for h in hits)
            refused += result.refused
        n = len(with_answers)
        results["answers"] = {
            "n": n,
            "answer_containment": round(answered / n, 4),
            "evidence_containment": round(evidence_hit / n, 4),
            "refusal_rate": round(refused / n, 4),
        }
    results["per_question"] = per_question
    return results
