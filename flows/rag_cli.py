"""``posttrain rag``: add documents to the retrieval index and ask it questions.

``flows.cli`` wires this in with ``add_rag_parser(subparsers)`` and dispatches ``args.func(args)``;
each handler returns an exit code. ``python -m flows.rag_cli ARGS`` is the same as
``posttrain rag ARGS`` (handy in tests and before the package is installed).

Heavy imports (unstructured, pymilvus, sentence-transformers) happen inside the handlers so
``posttrain --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from functools import wraps
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from components.errors import MissingInputError, PosttrainError
from components.params import Params, RagIndexConfig, load_params

PROG = "posttrain rag"
EXIT_USER_ERROR = 2

_RAG_DESCRIPTION = """\
Build and search the document index that the model answers from.

Documents (PDF, HTML, Markdown, DOCX, plain text) are parsed with unstructured, cleaned
(navigation, running headers, hidden HTML text quarantined), split into chunks (by_title,
fixed or sentence_window, sized in tokens of the embedding model), deduplicated, embedded with
MiniLM and stored in a Milvus collection with a dense vector field, a BM25 sparse field and
metadata fields (source, title, section, page, file_type, modified, content_hash).

Questions are answered by dense, sparse (BM25) or hybrid search (both, fused by reciprocal
rank fusion), then reranked by a cross-encoder the pipeline trains on the corpus (stage
rag_reranker). `ask` answers with citations from that evidence; `eval` scores retrieval on a
question set.

The index lives in a Milvus Lite file by default (rag_index.uri in params.yaml, normally
data/rag/milvus.db, the rag_index stage's output); a URI such as http://localhost:19530 uses a
Milvus server instead. A Milvus Lite file can be open in one process at a time."""

_RAG_EPILOG = """\
examples:
  posttrain rag ingest data/docs
  posttrain rag query "What is the capital of Fosaduia?"
  posttrain rag query "visa fee in Lubaa" --mode sparse --top-k 3 --json
  posttrain rag query "pdf pages about exports" --filter 'file_type == "pdf"'
  posttrain rag query --batch questions.jsonl > answers.jsonl
  posttrain rag ask "When is the lantern festival in Rapeba?"
  posttrain rag eval data/rag_eval/questions.jsonl

defaults for --collection and --uri come from the rag_index section of ./params.yaml
(or posttrain_docs and data/rag/milvus.db when there is no params.yaml)."""

_INGEST_DESCRIPTION = """\
Parse, clean, chunk, embed and store files. Folders are searched recursively (hidden files
are ignored). Ingesting is incremental: a file whose bytes did not change since it was indexed
is not even parsed, a changed file has only its own chunks replaced, and with --prune the
chunks of files that no longer exist under the given folders are removed. Files that cannot
be read (unsupported type, corrupt, no text) are skipped and listed with the reason; they
never stop the others and never remove what the index already holds. Exact and near-duplicate
chunks are dropped, and hidden HTML text (comments, scripts, display:none) is quarantined;
both are listed.

Exit status: 0 when at least one file was indexed, 1 when none was, 2 on an error."""

_INGEST_EPILOG = """\
examples:
  posttrain rag ingest data/docs                       # a folder, recursively
  posttrain rag ingest notes.md report.pdf             # single files
  posttrain rag ingest docs/ --collection team_docs --uri /tmp/team.db
  posttrain rag ingest docs/ --prune                   # also drop files deleted from docs/
  posttrain rag ingest docs/ --uri http://localhost:19530"""

EXPANSIONS = ("none", "prf", "multi_query")  # components.rag.index.EXPANSIONS, without importing it

_QUERY_DESCRIPTION = """\
Print the chunks that best answer a question, best first.

Search modes:
  dense   cosine similarity of MiniLM embeddings: finds paraphrases and related wording
  sparse  BM25 over the chunk text: finds exact names, codes and numbers (no model load)
  hybrid  both, fused with reciprocal rank fusion (rag_index.rrf_k) or weighted: the default

With rag_index.expansion: prf (the default) the question is searched twice: the terms the
first hits share extend the BM25 query and their vectors pull the question's (pseudo-relevance
feedback, no generator needed); rag_index.expansion: none searches once; multi_query asks the
generator (rag_index.generator, or --generator) for rag_index.expansion_queries other wordings
and one hypothetical answer passage (HyDE), searches each and fuses the lists with RRF; the
queries it searched are printed on stderr.

With --rerank, rag_index.candidates hits are retrieved and reranked down to --top-k
(default: rag_index.rerank, off). --reranker (rag_index.reranker) picks how: trained, the
cross-encoder the rag_reranker stage fine-tunes (on real manuals it ranked below plain hybrid),
or query_likelihood, which scores each candidate by how likely rag_index.ql_model (the bundled
SmolLM2) finds the question after reading it: no training, +0.05 MRR@10 over hybrid on real
manuals, about 9 s per question for 30 candidates on 2 CPU cores (see the README).

--filter takes a Milvus boolean expression over the metadata fields source, title, section,
page, file_type, modified, content_hash, e.g.
  'file_type == "pdf" and page <= 3'    'source like "docs/manual/%"'

With --json the output is one JSON object:
  {"hits": [{"source": PATH, "score": FLOAT, "text": STR, "chunk_id": STR, "metadata": {...}}]}
where PATH is the path as given to ingest. Scores are higher-is-better in every mode (after
reranking: the cross-encoder's logit).

With --batch FILE (JSON lines, each {"id": ..., "question": ...}; "-" reads stdin) the output
is one JSON line {"id": ..., "hits": [...]} per input line, in input order. Blank lines are
ignored; a malformed line stops the run with the file name and line number before any
search is made."""

_QUERY_EPILOG = """\
examples:
  posttrain rag query "When is the lantern festival in Rapeba?"
  posttrain rag query "Satipia copper exports" --mode sparse --top-k 3
  posttrain rag query "Which stage builds the index?" --json | jq '.hits[0].source'
  posttrain rag query --batch questions.jsonl --top-k 3 > hits.jsonl
  posttrain rag query "record low temperature" --filter 'file_type == "docx"' --no-rerank"""

_ASK_DESCRIPTION = """\
Answer a question from the index, with numbered citations.

Modes (default: rag_index.answer_mode):
  extractive  quotes the evidence sentences that best answer the question: useful with any
              generator, and the default while the promoted model cannot answer open questions
  generative  the generator (rag_index.generator: champion = the promoted policy, a bundled
              model such as smollm2-135m-instruct, or a local directory) reads a context of
              numbered, delimited passages within rag_index.context_tokens and answers

Retrieved text is data, never instructions: sentences that read as instructions to an
assistant ("ignore previous instructions ...", role tags) are removed from the evidence and
reported under "flagged", as is hidden HTML at ingest time. When no evidence sentence is
similar enough to the question (rag_index.min_support) the answer is "I don't know".

With --json: {"answer": STR, "citations": [{"source", "chunk_id", "page"}], "refused": BOOL,
"flagged": [...], "mode": STR, "support": FLOAT}."""

_ASK_EPILOG = """\
examples:
  posttrain rag ask "When is the lantern festival in Rapeba?"
  posttrain rag ask "Which country charges no visa fee?" --json
  posttrain rag ask "What is Gubu known for?" --mode generative --generator smollm2-135m-instruct"""

_EVAL_DESCRIPTION = """\
Score retrieval on a question set and log it to MLflow.

QUESTIONS is JSON lines {"id", "question", "relevant": [source paths], "answer": optional}.
Reports file-level recall@1/5/10, MRR@10 and nDCG@10 for dense, sparse, hybrid, hybrid with
pseudo-relevance feedback and (when a reranker exists) hybrid + rerank, and, where answers are
given, whether the extractive answer and the retrieved evidence contain them. A relevant path
matches a hit's source when one ends with the other (docs/a.pdf matches data/docs/a.pdf)."""

_EVAL_EPILOG = """\
examples:
  posttrain rag eval data/rag_eval/questions.jsonl
  posttrain rag eval questions.jsonl --json > report.json"""


# -- helpers ---------------------------------------------------------------------------------


def _quiet_known_noise() -> None:
    """Keep the CLI's stderr to what the user needs.

    bitsandbytes warns about an optional CPU kernel on import (harmless: no CPU kernel is used);
    pymilvus logs every failed RPC with a traceback, which the store already turns into one
    error line.
    """
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)


def project_params(params_path: str | Path = "params.yaml") -> Params:
    """``./params.yaml`` when it exists, else the built-in defaults."""
    return load_params(params_path) if Path(params_path).is_file() else Params()


def rag_config(params_path: str | Path = "params.yaml") -> RagIndexConfig:
    """``rag_index`` from ``./params.yaml`` when it exists, else the built-in defaults."""
    return project_params(params_path).rag_index


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _handler(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """User errors become one line on stderr and exit code 2, never a traceback."""

    @wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except PosttrainError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130

    return wrapper


def _resolve(args: argparse.Namespace) -> tuple[RagIndexConfig, str, str]:
    cfg = rag_config()
    if getattr(args, "reranker", None):
        cfg = replace(cfg, reranker=args.reranker)
    return cfg, args.uri or cfg.uri, args.collection or cfg.collection


def _add_reranker_option(parser: Any) -> None:  # a parser or an argument group
    parser.add_argument(
        "--reranker",
        metavar="NAME",
        help="trained (the rag_reranker stage's cross-encoder), query_likelihood (log P(question | "
        "passage) under rag_index.ql_model: no training, best on real manuals, seconds per question "
        "on a CPU), none, or a CrossEncoder directory (default: rag_index.reranker)",
    )


def _load_embedder(name: str) -> Any:
    from components.rag.embedding import get_embedder

    try:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2") or 2))
    except (ImportError, ValueError):
        pass
    return get_embedder(name)


# -- ingest ----------------------------------------------------------------------------------


def _require_index(uri: str) -> None:
    from components.rag.store import is_lite_uri

    if is_lite_uri(uri) and not os.path.exists(uri):  # opening would create an empty database
        raise MissingInputError(
            f"no index at {uri}; build it with `posttrain rag ingest PATH` or the rag_index stage, "
            "or pass --uri"
        )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@_handler
def cmd_ingest(args: argparse.Namespace) -> int:
    """``posttrain rag ingest PATH...``"""
    _quiet_known_noise()
    cfg, uri, collection = _resolve(args)
    from components.rag.store import open_store
    from tasks.rag_index import chunking_config, ingest_with_config

    chunking_config(cfg).validate()
    for path in args.paths:  # before loading anything: a typo should fail in milliseconds
        if not os.path.exists(path):
            raise MissingInputError(f"{path}: no such file or directory")
    with open_store(uri, collection) as store:
        embedder = _load_embedder(cfg.embedding_model)
        report = ingest_with_config(
            cfg, args.paths, store, embedder, prune=args.prune, progress=not args.quiet
        )
        total = store.count()
    if args.json:
        print(
            json.dumps(
                {**report.metrics(), "indexed": report.indexed, "pruned": report.pruned, "total": total}
            )
        )
        return 0 if report.n_documents else 1
    if not report.n_documents and not report.skipped and not report.pruned:
        from components.rag.parsing import SUPPORTED_EXTENSIONS

        print(
            f"{PROG}: no supported files under {', '.join(args.paths)} "
            f"(supported: {', '.join(SUPPORTED_EXTENSIONS)}); the index was not changed",
            file=sys.stderr,
        )
        return 1
    changed = report.n_documents - len(report.unchanged)
    print(
        f"indexed {_plural(report.n_documents, 'file')} ({changed} new or changed, "
        f"{len(report.unchanged)} unchanged) into collection {collection!r} at {uri}: "
        f"chunks +{report.added} added, ~{report.updated} updated, -{report.removed} removed "
        f"(now {total} chunks in total)"
    )
    for source, n in report.pruned.items():
        print(f"pruned {source}: {_plural(n, 'chunk')} removed (file no longer exists)")
    if report.duplicates:
        print(f"dropped {_plural(len(report.duplicates), 'duplicate chunk')}")
    if report.quarantined:
        print(f"quarantined {_plural(len(report.quarantined), 'hidden passage')} (not indexed):")
        for q in report.quarantined:
            print(f"  {q['source']}: {q['kind']}: {textwrap.shorten(q['text'], 80, placeholder=' ...')}")
    if report.skipped:
        print(f"skipped {_plural(len(report.skipped), 'file')}:")
        for s in report.skipped:
            print(f"  {s.source}: {s.reason}")
    return 0 if report.n_documents else 1


# -- query -----------------------------------------------------------------------------------


def read_batch(path: str) -> list[tuple[Any, str]]:
    """Read ``{"id": ..., "question": ...}`` lines; any malformed line is a :class:`DataError`.

    Everything is validated before the first search, so a bad line 900 does not leave
    899 answers and an error behind.
    """
    if path == "-":
        return _parse_batch(sys.stdin, "<stdin>")
    if not os.path.isfile(path):
        raise MissingInputError(f"{path}: no such file (--batch expects a JSON-lines file)")
    with open(path, "rb") as fh:  # bytes: a bad byte is "FILE:LINE: not valid UTF-8", not a traceback
        return _parse_batch(fh, path)


def _parse_batch(lines: TextIO | BinaryIO | Iterator[str], name: str) -> list[tuple[Any, str]]:
    from components.data.jsonl import parse_jsonl_lines
    from components.rag.evaluation import id_and_question

    return [id_and_question(record, f"{name}:{number}") for number, record in parse_jsonl_lines(lines, name)]


def _print_readable(hits: Sequence[Any], out: TextIO) -> None:
    if not hits:
        print("no results", file=out)
        return
    for rank, hit in enumerate(hits, start=1):
        where = f"{hit.source} (page {hit.page})" if hit.page else hit.source
        print(f"{rank}. {where}  score={hit.score:.4f}  chunk={hit.chunk_id}", file=out)
        text = " ".join(hit.text.split())
        print(
            textwrap.indent(textwrap.fill(textwrap.shorten(text, 400, placeholder=" ..."), 96), "   "),
            file=out,
        )


class _Session:
    """The store, embedder, reranker and retrieval options one command works with."""

    def __init__(self, args: argparse.Namespace, *, need_embedder: bool = True) -> None:
        from components.rag import service
        from components.rag.store import open_store

        self.params = project_params()
        self.cfg, uri, collection = _resolve(args)
        _require_index(uri)
        self._store_cm = open_store(uri, collection)
        self.store = self._store_cm.__enter__()
        try:
            self.store.count()  # fails with a clear message when the collection does not exist
            self.filter = self.store.validate_filter(args.filter) if getattr(args, "filter", None) else ""
            self.embedder = _load_embedder(self.cfg.embedding_model) if need_embedder else None
            if self.embedder is not None:
                self.store.check_compatible({"embedding_model": self.embedder.name, "dim": self.embedder.dim})
            rerank = getattr(args, "rerank", None)
            self.reranker = (
                service.load_reranker(self.cfg, self.params.paths.reranker, rerank) if need_embedder else None
            )
            self._generator: Any = None
            self.expansion = getattr(args, "expansion", None) or self.cfg.expansion
            self.rewriter = None
            if self.expansion == "multi_query":  # the generator loads once the index is known to be fine
                generate, _ = self.generator(getattr(args, "generator", None) or self.cfg.generator)
                rewrite = service.make_rewriter(generate, self.cfg.expansion_queries)

                def shown(question: str) -> list[str]:  # the user sees what was searched
                    queries = rewrite(question)
                    print(f"multi_query: {' | '.join(queries) or '(no usable rewrite)'}", file=sys.stderr)
                    return queries

                self.rewriter = shown
        except BaseException:
            self.close()
            raise

    def generator(self, name: str) -> Any:
        """The generator named (champion, bundled, or a directory), loaded once per command."""
        if self._generator is None:
            self._generator = _generator(name, self.params)
        return self._generator

    def close(self) -> None:
        self._store_cm.__exit__(None, None, None)

    def __enter__(self) -> _Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@_handler
def cmd_query(args: argparse.Namespace) -> int:
    """``posttrain rag query QUESTION`` / ``posttrain rag query --batch FILE``"""
    _quiet_known_noise()
    from components.rag.index import retrieve
    from components.rag.service import check_question, retrieval_options

    if args.batch and args.question:
        raise PosttrainError("give either QUESTION or --batch FILE, not both")
    if not args.batch and not (args.question or "").strip():
        raise PosttrainError("a QUESTION (or --batch FILE) is required")
    items = read_batch(args.batch) if args.batch else [(None, args.question)]
    items = [(item_id, check_question(q)) for item_id, q in items]
    cfg = rag_config()
    mode = args.mode or cfg.mode
    if mode == "sparse" and args.rerank is None:
        args.rerank = False  # sparse alone means "no model load"; --rerank turns it back on
    with _Session(args, need_embedder=mode != "sparse" or bool(args.rerank)) as session:
        opts = retrieval_options(
            session.cfg, mode=mode, top_k=args.top_k, filter=session.filter, expansion=session.expansion
        )
        results = [
            retrieve(
                session.store,
                session.embedder,
                question,
                opts,
                reranker=session.reranker,
                rewriter=session.rewriter,
            )  # fmt: skip
            for _, question in items
        ]
    if args.batch:
        for (item_id, _), hits in zip(items, results, strict=True):
            print(json.dumps({"id": item_id, "hits": [h.to_json() for h in hits]}, ensure_ascii=False))
    elif args.json:
        print(json.dumps({"hits": [h.to_json() for h in results[0]]}, ensure_ascii=False))
    else:
        _print_readable(results[0], sys.stdout)
    return 0


def _generator(name: str, params: Params) -> Any:
    """The generative mode's model: the champion from the MLflow registry, or a bundled/local one."""
    from components.rag import service

    if name != "champion":
        return service.load_generator(name)
    import mlflow

    from tasks.tracking import configure

    configure(params.tracking)
    uri = f"models:/{params.tracking.registered_model}@{params.evaluate.promotion_alias}"
    try:
        parts = mlflow.transformers.load_model(uri, return_type="components")
    except Exception as exc:  # noqa: BLE001 - registry errors come in many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PosttrainError(
            f"cannot load the champion ({uri}): {first}; run `posttrain run` first, or pass "
            "--generator smollm2-135m-instruct (or a model directory)"
        ) from None
    return service.make_generator(parts["model"], parts["tokenizer"])


@_handler
def cmd_ask(args: argparse.Namespace) -> int:
    """``posttrain rag ask QUESTION``"""
    _quiet_known_noise()
    from components.rag import service

    question = service.check_question(args.question)
    with _Session(args) as session:
        cfg = session.cfg
        mode = args.mode or cfg.answer_mode
        generator = None
        if mode == "generative":
            generator = session.generator(args.generator or cfg.generator)
        opts = service.retrieval_options(
            cfg, top_k=args.top_k, filter=session.filter, expansion=session.expansion
        )
        result, _ = service.answer(
            question,
            session.store,
            session.embedder,
            opts,
            reranker=session.reranker,
            mode=mode,
            min_support=cfg.min_support,
            generator=generator,
            context_tokens=cfg.context_tokens,
            rewriter=session.rewriter,
        )
    if args.json:
        print(json.dumps(result.to_json(), ensure_ascii=False))
        return 0
    print(textwrap.fill(result.answer, 96))
    if result.citations:
        print()
        for c in result.citations:
            where = f"{c.source} (page {c.page})" if c.page else c.source
            print(f"[{c.number}] {where}  chunk={c.chunk_id}")
    for f in result.flagged:
        text = textwrap.shorten(str(f.get("text", "")), 80, placeholder=" ...")
        print(f"flagged: {f.get('source')}: {f.get('reason')}: {text}", file=sys.stderr)
    return 0


@_handler
def cmd_eval(args: argparse.Namespace) -> int:
    """``posttrain rag eval QUESTIONS.jsonl``"""
    _quiet_known_noise()
    from components.rag import service
    from components.rag.evaluation import read_questions

    questions = read_questions(args.questions)
    with _Session(args) as session:
        report = service.evaluate(
            questions,
            session.store,
            session.embedder,
            session.cfg,
            # the hybrid + rerank row whenever a reranker exists; rag_index.rerank picks the default
            reranker=service.find_reranker(session.cfg, session.params.paths.reranker, warn=False),
            progress=not args.json,
            rewriter=session.rewriter,  # --expansion multi_query adds the hybrid_multi_query row
        )
        if not args.no_mlflow:
            log_eval_to_mlflow(session.params, report, args.questions)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return 0
    print(format_eval(report))
    return 0


def format_eval(report: dict[str, Any]) -> str:
    """The per-mode table a person reads (the README's table has the same columns)."""
    cols = ("recall_at_1", "recall_at_5", "recall_at_10", "mrr_at_10", "ndcg_at_10")
    lines = [f"{report['n_questions']} questions; default mode: {report['default_mode']}", ""]
    lines.append(f"{'mode':<15}" + "".join(f"{c.replace('_at_', '@'):>11}" for c in cols))
    for name, scores in report["modes"].items():
        lines.append(f"{name:<15}" + "".join(f"{scores[c]:>11.3f}" for c in cols))
    if "answers" in report:
        a = report["answers"]
        lines += [
            "",
            f"answers ({a['n']} with an expected answer): answer contains it {a['answer_containment']:.3f}, "
            f"evidence contains it {a['evidence_containment']:.3f}, refused {a['refusal_rate']:.3f}",
        ]
    return "\n".join(lines)


def log_eval_to_mlflow(params: Params, report: dict[str, Any], questions: str) -> None:
    """One MLflow run (experiment ``tracking.experiment``) with every mode's metrics."""
    from tasks.stage import numeric_metrics
    from tasks.tracking import stage_run

    with stage_run("rag_eval", params.tracking) as tracker:
        tracker.log_params({"rag_eval.questions": questions, "rag_eval.n_questions": report["n_questions"]})
        tracker.log_metrics(numeric_metrics({k: v for k, v in report.items() if k != "per_question"}))


# -- parser ----------------------------------------------------------------------------------


def _add_store_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("index location")
    group.add_argument(
        "--collection",
        metavar="NAME",
        help="Milvus collection (default: rag_index.collection in ./params.yaml, else posttrain_docs)",
    )
    group.add_argument(
        "--uri",
        metavar="URI",
        help="a Milvus Lite file ending in .db, or a server such as http://localhost:19530 "
        "(default: rag_index.uri in ./params.yaml, else data/rag/milvus.db)",
    )


def _add_retrieval_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("retrieval")
    group.add_argument(
        "--filter",
        metavar="EXPR",
        help="a Milvus boolean expression over metadata, e.g. 'file_type == \"pdf\" and page > 2'",
    )
    group.add_argument(
        "--rerank",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rerank rag_index.candidates hits with the reranker (--reranker) "
        "(default: rag_index.rerank, off)",
    )
    _add_reranker_option(group)
    group.add_argument(
        "--expansion",
        choices=EXPANSIONS,
        default=None,
        help="query expansion: prf (pseudo-relevance feedback), multi_query (the generator rewrites "
        "the question rag_index.expansion_queries ways and writes a hypothetical answer; lists fused "
        "by RRF) or none "
        "(default: rag_index.expansion, prf)",
    )


def add_rag_parser(subparsers: Any) -> None:
    """Add ``rag`` (``ingest``, ``query``, ``ask``, ``eval``) to an argparse subparsers object."""
    fmt = argparse.RawDescriptionHelpFormatter
    rag = subparsers.add_parser(
        "rag",
        help="build, query and evaluate the document index; answer from it (ingest, query, ask, eval)",
        description=_RAG_DESCRIPTION,
        epilog=_RAG_EPILOG,
        formatter_class=fmt,
    )
    commands = rag.add_subparsers(dest="rag_command", metavar="COMMAND", required=True)

    ingest = commands.add_parser(
        "ingest",
        help="add files and folders to the index (re-ingesting replaces)",
        description=_INGEST_DESCRIPTION,
        epilog=_INGEST_EPILOG,
        formatter_class=fmt,
    )
    ingest.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (searched recursively)")
    ingest.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ingest.add_argument(
        "--prune",
        action="store_true",
        help="also remove the chunks of indexed files under PATH that no longer exist",
    )
    ingest.add_argument("--json", action="store_true", help="print the ingest report as JSON")
    _add_store_options(ingest)
    ingest.set_defaults(func=cmd_ingest)

    query = commands.add_parser(
        "query",
        help="print the chunks that best answer a question",
        description=_QUERY_DESCRIPTION,
        epilog=_QUERY_EPILOG,
        formatter_class=fmt,
    )
    query.add_argument("question", nargs="?", metavar="QUESTION", help="the question, quoted")
    query.add_argument(
        "--batch",
        metavar="FILE",
        help='JSON-lines file of {"id": ..., "question": ...} ("-" for stdin); prints JSON lines',
    )
    query.add_argument(
        "-k",
        "--top-k",
        type=_positive_int,
        default=None,
        metavar="K",
        help="hits to return (default: rag_index.top_k in params.yaml, 5)",
    )
    query.add_argument(
        "--mode",
        choices=("dense", "sparse", "hybrid"),
        default=None,
        help="dense (MiniLM cosine), sparse (BM25) or hybrid (both, RRF) "
        "(default: rag_index.mode in params.yaml, hybrid)",
    )
    query.add_argument(
        "--json", action="store_true", help='print {"hits": [...]} as JSON (implied by --batch)'
    )
    _add_store_options(query)
    query.add_argument(
        "--generator",
        metavar="MODEL",
        help="--expansion multi_query's rewriter: champion, a bundled name or a directory "
        "(default: rag_index.generator)",
    )
    _add_retrieval_options(query)
    query.set_defaults(func=cmd_query)

    ask = commands.add_parser(
        "ask",
        help="answer a question from the index, with citations",
        description=_ASK_DESCRIPTION,
        epilog=_ASK_EPILOG,
        formatter_class=fmt,
    )
    ask.add_argument("question", metavar="QUESTION", help="the question, quoted")
    ask.add_argument(
        "--mode",
        choices=("extractive", "generative"),
        default=None,
        help="extractive (quote the best sentences) or generative (the generator answers) "
        "(default: rag_index.answer_mode, extractive)",
    )
    ask.add_argument(
        "--generator",
        metavar="MODEL",
        help="generative mode's model: champion, a bundled name or a directory "
        "(default: rag_index.generator)",
    )
    ask.add_argument(
        "-k",
        "--top-k",
        type=_positive_int,
        default=None,
        metavar="K",
        help="passages of evidence (default: 5)",
    )
    ask.add_argument("--json", action="store_true", help="print the answer as one JSON object")
    _add_retrieval_options(ask)
    _add_store_options(ask)
    ask.set_defaults(func=cmd_ask)

    evaluate = commands.add_parser(
        "eval",
        help="score retrieval per mode on a question set (recall, MRR, nDCG)",
        description=_EVAL_DESCRIPTION,
        epilog=_EVAL_EPILOG,
        formatter_class=fmt,
    )
    evaluate.add_argument("questions", metavar="QUESTIONS", help="JSON-lines question file")
    evaluate.add_argument("--json", action="store_true", help="print the whole report as JSON")
    evaluate.add_argument("--no-mlflow", action="store_true", help="do not log the results to MLflow")
    evaluate.add_argument(
        "--expansion",
        choices=EXPANSIONS,
        default=None,
        help="multi_query adds a hybrid_multi_query row (the generator rewrites each question); every "
        "other mode is always scored (default: rag_index.expansion)",
    )
    evaluate.add_argument(
        "--generator",
        metavar="MODEL",
        help="the multi_query rewriter: champion, a bundled name or a directory "
        "(default: rag_index.generator)",
    )
    _add_reranker_option(evaluate)  # the hybrid_rerank row's reranker
    _add_store_options(evaluate)
    evaluate.set_defaults(func=cmd_eval)


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone ``posttrain`` parser holding only ``rag`` (for ``python -m flows.rag_cli``)."""
    parser = argparse.ArgumentParser(prog="posttrain")
    add_rag_parser(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flows.rag_cli ingest docs/`` == ``posttrain rag ingest docs/``."""
    args = build_parser().parse_args(["rag", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
