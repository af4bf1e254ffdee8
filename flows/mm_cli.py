"""``posttrain mm``: ask the trained multimodal bridges about an image.

``flows.cli`` wires this in with ``add_mm_parser(subparsers)``. torch and transformers are
imported inside the handler so ``posttrain --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from components.errors import PosttrainError
from flows.deltas_cli import _positive_int, user_error_handler

PROG = "posttrain mm"

_DESCRIPTION = """\
Answer a question about an image with a bridge the `multimodal` stage trained (models/multimodal).

The image goes through the frozen MobileNetV2, the question through the SFT policy's chat
template, and the bridge joins them: flamingo (Perceiver resampler + tanh-gated cross-attention)
or palme (projected soft tokens). Images are converted to RGB (transparency on white) and resized
to the stage's image_size; images under 32 px a side are rejected. A question longer than the
LM's context is an error, not a truncation."""

_EPILOG = """\
examples:
  posttrain mm ask models/multimodal/data/images/eval_00000.png "how many circles are there?"
  posttrain mm ask photo.png "what colour is the triangle?" --method palme --json"""

_handler = user_error_handler(PROG, "mm_command")


@_handler
def cmd_ask(args: argparse.Namespace) -> int:
    if not args.question.strip():
        raise PosttrainError("QUESTION is empty")
    from transformers.utils import logging as hf_logging

    from components.multimodal import saved, vision
    from components.multimodal.bridging import check_fits, greedy_answers
    from components.multimodal.shapes import IMAGE_MARKER, load_image

    hf_logging.disable_progress_bar()
    pixels = load_image(args.image, saved.read_config(args.dir)["image_size"])  # bad input fails fast
    bridge, fmt, encoder, record = saved.load_bridge(args.dir, args.method)
    features = vision.encode(encoder, [pixels])[0]
    row = fmt.row(f"{IMAGE_MARKER} {args.question.replace(IMAGE_MARKER, '').strip()}", [features])
    check_fits(bridge, row, "the question")
    ids = greedy_answers(bridge, [row], fmt.stop_ids, max_new_tokens=args.max_new_tokens)[0]
    answer = fmt.tokenizer.decode(ids, skip_special_tokens=True).strip()
    method = args.method or record["methods"][0]
    if args.json:
        print(json.dumps({"method": method, "image": args.image, "answer": answer}, ensure_ascii=False))
    else:
        print(answer)
    return 0


def add_mm_parser(subparsers: Any) -> None:
    """Add ``mm`` (``ask``) to an argparse subparsers object."""
    fmt = argparse.RawDescriptionHelpFormatter
    mm = subparsers.add_parser(
        "mm",
        help="ask the trained Flamingo / PaLM-E bridge about an image (ask)",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=fmt,
    )
    commands = mm.add_subparsers(dest="mm_command", metavar="COMMAND", required=True)
    ask = commands.add_parser(
        "ask",
        help="print the bridge's greedy answer to QUESTION about IMAGE",
        description='Greedy answer to QUESTION about IMAGE. --json: {"method", "image", "answer"}.',
        formatter_class=fmt,
    )
    ask.add_argument("image", metavar="IMAGE", help="an image file (PNG, JPEG, ...)")
    ask.add_argument("question", metavar="QUESTION", help="the question, quoted")
    ask.add_argument(
        "--method",
        choices=("flamingo", "palme"),
        help="which trained bridge answers (default: the first trained, flamingo when both)",
    )
    ask.add_argument(
        "--dir", default="models/multimodal", metavar="DIR", help="stage output (default models/multimodal)"
    )
    ask.add_argument(
        "--max-new-tokens", type=_positive_int, default=8, metavar="N", help="answer length cap (default 8)"
    )
    ask.add_argument("--json", action="store_true", help='print {"method", "image", "answer"} as JSON')
    ask.set_defaults(func=cmd_ask)
