"""``posttrain adapters``: answer from several PEFT adapters that share one loaded base model.

``flows.cli`` wires this in with ``add_adapters_parser(subparsers)``. torch, transformers and
peft are imported inside the handlers so ``posttrain --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from components.errors import PosttrainError
from flows.deltas_cli import (
    _port,
    _positive_int,
    format_bytes,
    parse_delta_specs,
    serve_forever,
    user_error_handler,
)

PROG = "posttrain adapters"

_DESCRIPTION = """\
Serve several adapters trained over one base model from one copy of that base.

Each --adapter NAME=DIR is a stage output trained with peft.method lora, qlora, dora, ia3,
prefix or prompt over --base (e.g. models/sft adapters over models/base, or two `dvc exp`
runs' models/sft). The base is loaded once (an adapter chain is merged in fp32); each adapter
adds only its own tensors. An adapter trained over other base weights is refused (hash check).

A batch may mix adapters: LoRA adapters (lora, qlora) answer a mixed batch in one forward pass
(PEFT's adapter_names); other kinds answer one adapter group at a time. "base" names the bare
base model.

Routing: a request that names no adapter goes to the adapter whose --examples NAME=FILE.jsonl
prompts it is nearest to (mean-pooled hidden states of the base, nearest centroid); without
--examples it is answered by the base model."""

_EPILOG = """\
examples:
  posttrain adapters ask --base models/base --adapter add=runs/add --adapter rev=runs/rev \\
      --use add "add 2 and 3"
  posttrain adapters ask --base models/base --adapter add=runs/add --adapter rev=runs/rev \\
      --examples add=data/add.jsonl --examples rev=data/rev.jsonl "reverse abc"   # routed
  posttrain adapters serve --base models/base --adapter add=runs/add --adapter rev=runs/rev --port 8610
  curl -s localhost:8610/generate -d '{"adapter": "add", "prompt": "add 2 and 3"}'"""


_handler = user_error_handler(PROG, "adapters_command")


def _load(args: argparse.Namespace) -> Any:
    adapters = parse_delta_specs(args.adapter, option="--adapter")
    from transformers.utils import logging as hf_logging

    from components.peft.serving import AdapterServer, read_routing_examples

    examples = dict(read_routing_examples(spec) for spec in args.examples or [])

    hf_logging.disable_progress_bar()
    server = AdapterServer(args.base, adapters)
    if examples:
        server.fit_router(examples)
    return server


@_handler
def cmd_ask(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise PosttrainError("PROMPT is empty")
    server = _load(args)
    uses = args.use or [None]
    answers = server.ask_many([(name, args.prompt) for name in uses], max_new_tokens=args.max_new_tokens)
    for used, text in answers:
        if args.json:
            print(json.dumps({"adapter": used, "output": text}, ensure_ascii=False))
        elif len(answers) == 1:
            print(text)
        else:
            print(f"[{used}] {text}")
    return 0


@_handler
def cmd_serve(args: argparse.Namespace) -> int:
    from components.compression.delta_serving import build_http_server, check_loopback

    check_loopback(args.host)
    server = _load(args)
    httpd = build_http_server(server, args.host, args.port, default_max_new_tokens=args.max_new_tokens)
    report = server.memory_report()
    held = (
        f"{format_bytes(report['total_bytes'])} held vs "
        f"{format_bytes(report['as_full_models_bytes'])} as full models"
    )
    return serve_forever(httpd, f"{', '.join(server.names)} (and base) over {server.base_path}", held)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base", required=True, metavar="DIR", help="the base model the adapters were trained over"
    )
    parser.add_argument(
        "--adapter", action="append", required=True, metavar="NAME=DIR", help="an adapter directory; repeat"
    )
    parser.add_argument(
        "--examples",
        action="append",
        metavar="NAME=FILE.jsonl",
        help="example prompts for routing to NAME (lines with a 'prompt' or chat 'messages'); repeat",
    )
    parser.add_argument(
        "--max-new-tokens", type=_positive_int, default=32, metavar="N", help="answer length cap (default 32)"
    )


def add_adapters_parser(subparsers: Any) -> None:
    """Add ``adapters`` (``ask``, ``serve``) to an argparse subparsers object."""
    fmt = argparse.RawDescriptionHelpFormatter
    adapters = subparsers.add_parser(
        "adapters",
        help="serve several PEFT adapters over one base model, mixed batches and routing (ask, serve)",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=fmt,
    )
    commands = adapters.add_subparsers(dest="adapters_command", metavar="COMMAND", required=True)
    ask = commands.add_parser(
        "ask",
        help="print the answer of each selected adapter (or the routed one) to one prompt",
        description="Greedy answers to PROMPT, one per --use (default: routed, see `posttrain adapters -h`). "
        'Output: the answer alone for one, else "[NAME] answer" lines; --json: {"adapter", "output"} lines.',
        formatter_class=fmt,
    )
    ask.add_argument("prompt", metavar="PROMPT", help="the prompt, quoted (sent as one user turn)")
    ask.add_argument(
        "--use", action="append", metavar="NAME", help='an adapter to answer ("base": none); repeat'
    )
    ask.add_argument("--json", action="store_true", help='print {"adapter": NAME, "output": TEXT} JSON lines')
    _add_common(ask)
    ask.set_defaults(func=cmd_ask)
    serve = commands.add_parser(
        "serve",
        help="answer POST /generate and GET /health over HTTP on 127.0.0.1",
        description='POST /generate {"adapter": NAME or null, "prompt": TEXT, "max_new_tokens": N} -> '
        '{"adapter": NAME used, "output": TEXT}; GET /health -> {"adapters": [...], "memory": {...}}. '
        "No authentication, so loopback only.",
        formatter_class=fmt,
    )
    serve.add_argument("--host", default="127.0.0.1", help="loopback address (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8610, help="port; 0 picks a free one (default 8610)")
    _add_common(serve)
    serve.set_defaults(func=cmd_serve)
