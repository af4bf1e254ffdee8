"""``posttrain deltas``: answer from several Bit-Delta fine-tunes that share one base model.

``flows.cli`` wires this in with ``add_deltas_parser(subparsers)`` and dispatches
``args.func(args)``; each handler returns an exit code. ``python -m flows.deltas_cli ARGS`` is
the same as ``posttrain deltas ARGS``.

torch and transformers are imported inside the handlers so ``posttrain --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from functools import wraps
from pathlib import Path
from typing import Any

from components.errors import PosttrainError

PROG = "posttrain deltas"
EXIT_USER_ERROR = 2

_DELTAS_DESCRIPTION = """\
Serve many fine-tunes of one base model from one copy of its weights.

The compress stage with compress.method: bitdelta stores a fine-tune as one sign bit per
weight of its difference from the base, plus one scale per matrix (about 1/32 of an fp32
matrix). These commands load the base once and each fine-tune's bitdelta.safetensors beside
it, still packed, and apply the chosen one layer by layer as it runs: memory is the base plus
the packed deltas, not one full model per fine-tune. "base" names the bare base model.

Each --delta NAME=DIR is a compress output directory (or a bitdelta.safetensors file) made
from this base: a delta made from other base weights is refused (sha256 check). The tokenizer
saved beside the deltas is used; fine-tunes of one base must all have the same one.

Requests for different deltas never share a forward pass (each delta changes whole weight
matrices and may bring its own norm weights); they are answered one delta at a time."""

_DELTAS_EPILOG = """\
examples:
  posttrain deltas ask --delta chat=models/compressed "What is 2 + 3?"
  posttrain deltas ask --base models/base --delta a=runs/a --delta b=runs/b "Capital of Fosaduia?"
  posttrain deltas ask --delta a=runs/a --delta b=runs/b --use b --use base --json "hi"
  posttrain deltas memory --delta a=runs/a --delta b=runs/b
  posttrain deltas serve --delta a=runs/a --delta b=runs/b --port 8600

--base defaults to the base model that the first delta's bitdelta.json names."""

_ASK_DESCRIPTION = """\
Print the answer of each selected fine-tune (--use, repeatable; default: every --delta) to one
prompt, greedy unless --temperature is above 0. The prompt is sent as one user turn through
the tokenizer's chat template, as the evaluate stage does.

Output: the answer alone when one delta answers, else one "[NAME] answer" line per delta.
With --json: one JSON object per line, {"delta": NAME, "output": TEXT}, in --use order.

Exit status: 0 on success, 2 on a user error (bad --delta, unknown --use name, a delta made
from another base, a directory that is not a Bit-Delta output)."""

_ASK_EPILOG = """\
examples:
  posttrain deltas ask --delta chat=models/compressed "What is 2 + 3?"
  posttrain deltas ask --delta a=runs/a --delta b=runs/b --use a --use base "What is 2 + 3?"
  posttrain deltas ask --delta a=runs/a --max-new-tokens 64 --json "Spell 'cat' backwards" | jq .output"""

_MEMORY_DESCRIPTION = """\
Load the base and the deltas as `serve` would and print what they hold: the base's parameters
and buffers (once), each delta's packed signs, scales, biases and dense tensors, the total,
and what the same fine-tunes would take as full models (N x the base). --json prints the
report as one JSON object (the "memory" of GET /health)."""

_MEMORY_EPILOG = """\
examples:
  posttrain deltas memory --delta a=runs/a --delta b=runs/b
  posttrain deltas memory --base models/base --delta a=runs/a --json | jq .saving"""

_SERVE_DESCRIPTION = """\
Answer HTTP requests from the loaded fine-tunes until Ctrl-C. JSON in, JSON out:

  POST /generate  {"delta": NAME, "prompt": TEXT, "max_new_tokens": N}
                  -> {"delta": NAME, "output": TEXT}
                  "delta" null or "base" is the bare base model; max_new_tokens is optional
                  (default --max-new-tokens, at most 512)
  GET  /health    -> {"deltas": [NAME, ...], "memory": {...}} (see `posttrain deltas memory`)

Errors answer {"error": MESSAGE}: 400 for a bad body, 404 for an unknown delta (the message
lists the known ones) or route, 500 when generation fails. Requests run one at a time.

The server has no authentication, so it listens on loopback only (127.0.0.1 by default)."""

_SERVE_EPILOG = """\
examples:
  posttrain deltas serve --delta a=runs/a --delta b=runs/b
  curl -s localhost:8600/generate -d '{"delta": "a", "prompt": "What is 2 + 3?"}'
  curl -s localhost:8600/health | jq .memory.total_bytes"""


# -- helpers ---------------------------------------------------------------------------------


Handler = Callable[[argparse.Namespace], int]


def user_error_handler(prog: str, command_attr: str) -> Callable[[Handler], Handler]:
    """A decorator for ``prog``'s subcommand handlers (the subcommand in ``args.<command_attr>``):
    user errors become one line on stderr and exit code 2, never a traceback."""

    def decorate(fn: Handler) -> Handler:
        @wraps(fn)
        def wrapper(args: argparse.Namespace) -> int:
            try:
                return fn(args)
            except PosttrainError as exc:
                print(f"{prog} {getattr(args, command_attr)}: error: {exc}", file=sys.stderr)
                return EXIT_USER_ERROR
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return 130

        return wrapper

    return decorate


_handler = user_error_handler(PROG, "deltas_command")


def parse_delta_specs(specs: Sequence[str], option: str = "--delta") -> dict[str, Path]:
    """``["a=runs/a", ...]`` -> ``{"a": Path("runs/a")}``; a malformed or repeated one is an error."""
    deltas: dict[str, Path] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            raise PosttrainError(f"{option} {spec!r}: expected NAME=DIR, e.g. {option} chat=models/sft")
        if name in deltas:
            raise PosttrainError(f"{option} {name}: given twice ({deltas[name]} and {directory})")
        deltas[name] = Path(directory)
    return deltas


def default_base(deltas: dict[str, Path]) -> Path:
    """The base model the first delta's ``bitdelta.json`` names (what ``--base`` defaults to)."""
    from components.compression.delta_serving import BITDELTA_BASE_FILE

    name, directory = next(iter(deltas.items()))
    record = (directory if directory.is_dir() else directory.parent) / BITDELTA_BASE_FILE
    try:
        return Path(json.loads(record.read_text())["base_model"])
    except (OSError, ValueError, KeyError, TypeError):
        raise PosttrainError(
            f"--base DIR is required: delta {name!r} has no readable {record.name} naming its base model"
        ) from None


def _load_server(args: argparse.Namespace) -> Any:
    """The :class:`DeltaServer` for ``--base`` and the ``--delta`` options."""
    deltas = parse_delta_specs(args.delta)
    base = Path(args.base) if args.base else default_base(deltas)
    from transformers.utils import logging as hf_logging

    from components.compression.delta_serving import DeltaServer

    hf_logging.disable_progress_bar()  # "Loading weights" bars would bury the answer
    return DeltaServer(base, deltas, cache_active=args.cache_active)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535 (0: any free port), got {value}")
    return value


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 kB"``: decimal units, as file managers show model sizes."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def format_memory(report: dict[str, Any], base: str, paths: dict[str, str]) -> str:
    """The memory report as an aligned, readable table."""
    rows = [("base", base, format_bytes(report["base_bytes"]), "parameters and buffers, held once")]
    for name, sizes in report["deltas"].items():
        parts = [f"{sizes['matrices']} matrices as signs {format_bytes(sizes['sign_bytes'])}"]
        parts.append(f"scales {format_bytes(sizes['scale_bytes'])}")
        if sizes["bias_bytes"]:
            parts.append(f"biases {format_bytes(sizes['bias_bytes'])}")
        if sizes["dense_bytes"]:
            parts.append(f"dense {format_bytes(sizes['dense_bytes'])}")
        rows.append((f"delta {name}", paths.get(name, ""), format_bytes(sizes["bytes"]), ", ".join(parts)))
    if report["dense_backup_bytes"]:
        rows.append(("base copies", "", format_bytes(report["dense_backup_bytes"]), "of tensors deltas swap"))
    if report["active_cache_bytes"]:
        rows.append(("cache", "", format_bytes(report["active_cache_bytes"]), "active delta, unpacked"))
    rows.append(("total", "", format_bytes(report["total_bytes"]), ""))
    n = report["n_deltas"]
    rows.append(
        (
            "as full models",
            f"{n} x {format_bytes(report['base_bytes'])}",
            format_bytes(report["materialized_bytes"]),
            f"{report['saving']:.1f}x the total above",
        )
    )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d}".rstrip() for a, b, c, d in rows]
    return "\n".join(lines)


# -- commands --------------------------------------------------------------------------------


@_handler
def cmd_ask(args: argparse.Namespace) -> int:
    """``posttrain deltas ask --delta NAME=DIR ... PROMPT``"""
    if not args.prompt.strip():
        raise PosttrainError("PROMPT is empty")
    deltas = parse_delta_specs(args.delta)
    uses = args.use or list(deltas)
    from components.compression.delta_serving import BASE

    for name in uses:  # before any model is loaded: a typo should fail in milliseconds
        if name != BASE and name not in deltas:
            raise PosttrainError(f"--use {name}: unknown delta (known: {', '.join([BASE, *deltas])})")
    server = _load_server(args)
    answers = server.ask_many(
        [(name, args.prompt) for name in uses],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
    )
    for name, answer in zip(uses, answers, strict=True):
        if args.json:
            print(json.dumps({"delta": name, "output": answer}, ensure_ascii=False))
        elif len(uses) == 1:
            print(answer)
        else:
            print(f"[{name}] {answer}")
    return 0


@_handler
def cmd_memory(args: argparse.Namespace) -> int:
    """``posttrain deltas memory --delta NAME=DIR ...``"""
    server = _load_server(args)
    report = server.memory_report()
    if args.json:
        print(json.dumps(report))
    else:
        paths = {name: str(delta.path.parent) for name, delta in server.deltas.items()}
        print(format_memory(report, str(server.base_path), paths))
    return 0


@_handler
def cmd_serve(args: argparse.Namespace) -> int:
    """``posttrain deltas serve --delta NAME=DIR ... [--host H] [--port P]``"""
    from components.compression.delta_serving import build_http_server, check_loopback

    check_loopback(args.host)  # before the model loads
    server = _load_server(args)
    httpd = build_http_server(
        server, args.host, args.port, default_max_new_tokens=args.max_new_tokens, log=not args.quiet
    )
    report = server.memory_report()
    held = (
        f"{format_bytes(report['total_bytes'])} held, "
        f"{format_bytes(report['materialized_bytes'])} as full models"
    )
    return serve_forever(httpd, f"{', '.join(server.names)} (and base) from {server.base_path}", held)


def serve_forever(httpd: Any, what: str, held: str) -> int:
    """Print where ``httpd`` listens and serve until Ctrl-C (``posttrain deltas|adapters serve``)."""
    host, port = httpd.server_address[:2]
    print(
        f"serving {what} at http://{host}:{port}: {held}; POST /generate, GET /health; Ctrl-C stops",
        flush=True,
    )
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        httpd.server_close()
    return 0


# -- parser ----------------------------------------------------------------------------------


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models")
    group.add_argument(
        "--delta",
        action="append",
        required=True,
        metavar="NAME=DIR",
        help="a Bit-Delta fine-tune: NAME to ask for it by, DIR a compress output made with "
        "compress.method: bitdelta (or its bitdelta.safetensors); repeat for more",
    )
    group.add_argument(
        "--base",
        metavar="DIR",
        help="the base model directory the deltas were made from "
        "(default: the base_model in the first delta's bitdelta.json)",
    )
    group.add_argument(
        "--cache-active",
        action="store_true",
        help="unpack the selected delta's sign matrices once, not in every forward pass: much "
        "faster generation, one more fp32 copy of the delta'd matrices in memory",
    )


def add_deltas_parser(subparsers: Any) -> None:
    """Add ``deltas`` (with ``ask``, ``memory`` and ``serve``) to an argparse subparsers object."""
    fmt = argparse.RawDescriptionHelpFormatter
    deltas = subparsers.add_parser(
        "deltas",
        help="serve many Bit-Delta fine-tunes from one base model (ask, memory, serve)",
        description=_DELTAS_DESCRIPTION,
        epilog=_DELTAS_EPILOG,
        formatter_class=fmt,
    )
    commands = deltas.add_subparsers(dest="deltas_command", metavar="COMMAND", required=True)

    ask = commands.add_parser(
        "ask",
        help="print each selected fine-tune's answer to one prompt",
        description=_ASK_DESCRIPTION,
        epilog=_ASK_EPILOG,
        formatter_class=fmt,
    )
    ask.add_argument("prompt", metavar="PROMPT", help="the prompt, quoted (sent as one user turn)")
    ask.add_argument(
        "--use",
        action="append",
        metavar="NAME",
        help='which delta answers ("base": the bare base model); repeat for several '
        "(default: every --delta, in order)",
    )
    ask.add_argument(
        "--max-new-tokens", type=_positive_int, default=32, metavar="N", help="answer length cap (default 32)"
    )
    ask.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        metavar="T",
        help="sampling temperature; 0 (the default) is greedy",
    )
    ask.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    ask.add_argument("--json", action="store_true", help='print {"delta": NAME, "output": TEXT} JSON lines')
    _add_model_options(ask)
    ask.set_defaults(func=cmd_ask)

    memory = commands.add_parser(
        "memory",
        help="print the bytes the base and each packed delta hold, against full models",
        description=_MEMORY_DESCRIPTION,
        epilog=_MEMORY_EPILOG,
        formatter_class=fmt,
    )
    memory.add_argument("--json", action="store_true", help="print the report as one JSON object")
    _add_model_options(memory)
    memory.set_defaults(func=cmd_memory)

    serve = commands.add_parser(
        "serve",
        help="answer POST /generate and GET /health over HTTP on 127.0.0.1",
        description=_SERVE_DESCRIPTION,
        epilog=_SERVE_EPILOG,
        formatter_class=fmt,
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="loopback address to listen on (default 127.0.0.1)"
    )
    serve.add_argument(
        "--port", type=_port, default=8600, help="port to listen on; 0 picks a free one (default 8600)"
    )
    serve.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=32,
        metavar="N",
        help="answer length when a request gives no max_new_tokens (default 32)",
    )
    serve.add_argument("-q", "--quiet", action="store_true", help="no access log on stderr")
    _add_model_options(serve)
    serve.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone ``posttrain`` parser holding only ``deltas`` (for ``python -m flows.deltas_cli``)."""
    parser = argparse.ArgumentParser(prog="posttrain")
    add_deltas_parser(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flows.deltas_cli ask ...`` == ``posttrain deltas ask ...``."""
    args = build_parser().parse_args(["deltas", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
