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
from functools import wraps
from pathlib import Path
from typing import Any, TextIO

from components.errors import DataError, MissingInputError, PosttrainError
from components.params import RagIndexConfig, load_params

PROG = "posttrain rag"
EXIT_USER_ERROR = 2

_RAG_DESCRIPTION = """\
Build and search the document index that the model answers from.

Documents (PDF, HTML, Markdown, DOCX, plain text) are parsed with unstructured, split into
chunks at headings, embedded with MiniLM and stored in a Milvus collection that has a dense
vector field and a BM25 sparse field. Questions are answered by dense, sparse (BM25) or hybrid
(both, fused by reciprocal rank fusion) search.

The index lives in a Milvus Lite file by default (rag_index.uri in params.yaml, normally
data/rag/milvus.db, the rag_index stage's output); a URI such as http://localhost:19530 uses a
Milvus server instead. A Milvus Lite file can be open in one process at a time."""

_RAG_EPILOG = """\
examples:
  posttrain rag ingest data/docs
  posttrain rag query "What is the capital of Fosaduia?"
  posttrain rag query "visa fee in Lubaa" --mode sparse --top-k 3 --json
  posttrain rag query --batch questions.jsonl > answers.jsonl

defaults for --collection and --uri come from the rag_index section of ./params.yaml
(or posttrain_docs and data/rag/milvus.db when there is no params.yaml)."""

_INGEST_DESCRIPTION = """\
Parse, chunk, embed and store files. Folders are searched recursively (hidden files are
ignored). A file that was ingested before, under the same path, has its chunks replaced, so
ingesting again never creates duplicates. Files that cannot be read (unsupported type,
corrupt, no text) are skipped and listed with the reason; they never stop the others.

Exit status: 0 when at least one file was indexed, 1 when none was, 2 on an error."""

_INGEST_EPILOG = """\
examples:
  posttrain rag ingest data/docs                       # a folder, recursively
  posttrain rag ingest notes.md report.pdf             # single files
  posttrain rag ingest docs/ --collection team_docs --uri /tmp/team.db
  posttrain rag ingest docs/ --uri http://localhost:19530"""

_QUERY_DESCRIPTION = """\
Print the chunks that best answer a question, best first.

Search modes:
  dense   cosine similarity of MiniLM embeddings: finds paraphrases and related wording
  sparse  BM25 over the chunk text: finds exact names, codes and numbers (no model load)
  hybrid  both, fused with reciprocal rank fusion (k=60): the default

With --json the output is one JSON object:
  {"hits": [{"source": PATH, "score": FLOAT, "text": STR, "chunk_id": STR}, ...]}
where PATH is the path as given to ingest. Scores are higher-is-better in every mode.

With --batch FILE (JSON lines, each {"id": ..., "question": ...}; "-" reads stdin) the output
is one JSON line {"id": ..., "hits": [...]} per input line, in input order. Blank lines are
ignored; a malformed line stops the run with the file name and line number before any
search is made."""

_QUERY_EPILOG = """\
examples:
  posttrain rag query "When is the lantern festival in Rapeba?"
  posttrain rag query "Satipia copper exports" --mode sparse --top-k 3
  posttrain rag query "Which stage builds the index?" --json | jq '.hits[0].source'
  posttrain rag query --batch questions.jsonl --top-k 3 > hits.jsonl"""


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


def rag_config(params_path: str | Path = "params.yaml") -> RagIndexConfig:
    """``rag_index`` from ``./params.yaml`` when it exists, else the built-in defaults."""
    if Path(params_path).is_file():
        return load_params(params_path).rag_index
    return RagIndexConfig()


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
    return cfg, args.uri or cfg.uri, args.collection or cfg.collection


def _load_embedder(name: str) -> Any:
    from components.rag.embedding import get_embedder

    try:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2") or 2))
    except (ImportError, ValueError):
        pass
    return get_embedder(name)


# -- ingest ----------------------------------------------------------------------------------


@_handler
def cmd_ingest(args: argparse.Namespace) -> int:
    """``posttrain rag ingest PATH...``"""
    _quiet_known_noise()
    cfg, uri, collection = _resolve(args)
    from components.rag.chunking import validate_chunking
    from components.rag.index import ingest
    from components.rag.store import open_store

    validate_chunking(cfg.chunk_max_characters, cfg.chunk_overlap)
    for path in args.paths:  # before loading anything: a typo should fail in milliseconds
        if not os.path.exists(path):
            raise MissingInputError(f"{path}: no such file or directory")
    with open_store(uri, collection) as store:
        embedder = _load_embedder(cfg.embedding_model)
        report = ingest(
            args.paths,
            store,
            embedder,
            max_characters=cfg.chunk_max_characters,
            overlap=cfg.chunk_overlap,
            languages=cfg.languages,
            progress=not args.quiet,
        )
        total = store.count()
    files = "file" if report.n_documents == 1 else "files"
    print(
        f"indexed {report.n_documents} {files}, {report.n_chunks} chunks into collection "
        f"{collection!r} at {uri} (now {total} chunks in total)"
    )
    if report.skipped:
        print(f"skipped {len(report.skipped)} file{'s' if len(report.skipped) != 1 else ''}:")
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
    with open(path, encoding="utf-8") as fh:
        return _parse_batch(fh, path)


def _parse_batch(lines: TextIO | Iterator[str], name: str) -> list[tuple[Any, str]]:
    from components.data.jsonl import parse_jsonl_lines

    items: list[tuple[Any, str]] = []
    for number, record in parse_jsonl_lines(lines, name):
        if "id" not in record:
            raise DataError(f'{name}:{number}: missing "id"')
        question = record.get("question")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f'{name}:{number}: "question" must be a non-empty string')
        items.append((record["id"], question))
    return items


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


@_handler
def cmd_query(args: argparse.Namespace) -> int:
    """``posttrain rag query QUESTION`` / ``posttrain rag query --batch FILE``"""
    _quiet_known_noise()
    if args.batch and args.question:
        raise PosttrainError("give either QUESTION or --batch FILE, not both")
    if not args.batch and not (args.question or "").strip():
        raise PosttrainError("a QUESTION (or --batch FILE) is required")
    cfg, uri, collection = _resolve(args)
    mode, top_k = args.mode or cfg.mode, args.top_k or cfg.top_k
    items = read_batch(args.batch) if args.batch else [(None, args.question)]

    from components.rag.store import is_lite_uri, open_store

    if is_lite_uri(uri) and not os.path.exists(uri):  # opening would create an empty database
        raise MissingInputError(
            f"no index at {uri}; build it with `posttrain rag ingest PATH` or the rag_index stage, "
            "or pass --uri"
        )

    with open_store(uri, collection) as store:
        store.count()  # fails with a clear message when the collection does not exist
        vectors: Sequence[Any] = [None] * len(items)
        if mode != "sparse":
            embedder = _load_embedder(cfg.embedding_model)
            vectors = embedder.encode([q for _, q in items])
        results = [
            store.search(question, vector, mode=mode, top_k=top_k)
            for (_, question), vector in zip(items, vectors, strict=True)
        ]
    if args.batch:
        for (item_id, _), hits in zip(items, results, strict=True):
            print(json.dumps({"id": item_id, "hits": [h.to_json() for h in hits]}, ensure_ascii=False))
    elif args.json:
        print(json.dumps({"hits": [h.to_json() for h in results[0]]}, ensure_ascii=False))
    else:
        _print_readable(results[0], sys.stdout)
    return 0


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


def add_rag_parser(subparsers: Any) -> None:
    """Add ``rag`` (with ``ingest`` and ``query``) to an argparse subparsers object."""
    fmt = argparse.RawDescriptionHelpFormatter
    rag = subparsers.add_parser(
        "rag",
        help="build and query the document index (ingest, query)",
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
    query.set_defaults(func=cmd_query)


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
