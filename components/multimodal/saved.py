"""Build a bridge from params, save what it learned, and load it back for ``posttrain mm ask``.

The ``multimodal`` stage's output directory holds the frozen encoder as safetensors
(``vision_encoder.safetensors``), one folder per trained bridge with only its trainable tensors
(``flamingo/bridge.safetensors``, ``palme/bridge.safetensors``), ``multimodal.json`` (which LM,
image size and bridge sizes) and ``base_model.json``, the fingerprint of the LM the bridges were
trained over: loading them over other weights fails loudly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from components.errors import MissingInputError
from components.multimodal import vision
from components.multimodal.bridging import PromptFormat, load_trainable, save_trainable
from components.multimodal.flamingo import FlamingoLM, FlamingoShape, marker_ids
from components.multimodal.palme import PalmeLM, PalmeShape

CONFIG_FILE = "multimodal.json"
ENCODER_FILE = "vision_encoder.safetensors"
BRIDGE_FILE = "bridge.safetensors"
METHODS = ("flamingo", "palme")


def shapes_from(cfg: Any) -> dict[str, dict[str, Any]]:
    """The bridge sizes from a ``MultimodalConfig`` (plain dicts, as saved in ``multimodal.json``)."""
    out = {}
    for method, shape_class in (("flamingo", FlamingoShape), ("palme", PalmeShape)):
        settings = getattr(cfg, method)  # every shape field the params section names, by name
        shape = shape_class(
            **{f.name: getattr(settings, f.name) for f in fields(shape_class) if hasattr(settings, f.name)}
        )
        out[method] = asdict(shape)
    return out


def build_bridge(
    method: str, lm: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, shape: dict[str, Any]
) -> torch.nn.Module:
    """A fresh bridge over ``lm`` (which it freezes): the gates at 0 / a random projector."""
    torch.manual_seed(0)
    if method == "flamingo":
        return FlamingoLM(lm, FlamingoShape(**shape), marker_ids(tokenizer), tokenizer.pad_token_id)
    return PalmeLM(lm, PalmeShape(**shape))


def save_encoder(state: dict[str, torch.Tensor], out_dir: Path) -> None:
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / ENCODER_FILE))


def save_config(out_dir: Path, record: dict[str, Any]) -> None:
    (out_dir / CONFIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def save_bridge(bridge: torch.nn.Module, out_dir: Path, method: str) -> None:
    (out_dir / method).mkdir(parents=True, exist_ok=True)
    save_trainable(bridge, out_dir / method / BRIDGE_FILE)


def read_config(out_dir: Path | str) -> dict[str, Any]:
    path = Path(out_dir) / CONFIG_FILE
    if not path.is_file():
        raise MissingInputError(
            f"{path}: no trained multimodal bridge here (run the multimodal stage: `dvc repro multimodal`)"
        )
    return json.loads(path.read_text())


def load_bridge(
    out_dir: Path | str, method: str | None = None
) -> tuple[torch.nn.Module, PromptFormat, vision.MobileNetV2, dict[str, Any]]:
    """(bridge, prompt format, frozen encoder, config) of a trained bridge in the stage's output.

    ``method`` defaults to the first one trained (flamingo, then palme).
    """
    from components.models.loading import load_tokenizer
    from components.peft.adapters import check_base, load_policy

    out_dir = Path(out_dir)
    record = read_config(out_dir)
    trained = record["methods"]
    method = method or trained[0]
    if method not in trained:
        raise MissingInputError(
            f"{out_dir}: no {method} bridge was trained here (trained: {', '.join(trained) or 'none'})"
        )
    lm_dir = Path(record["lm"])
    if not lm_dir.exists():
        raise MissingInputError(f"{lm_dir}: the LM these bridges were trained over is missing")
    check_base(out_dir, lm_dir)
    tokenizer = load_tokenizer(lm_dir)
    bridge = build_bridge(method, load_policy(lm_dir), tokenizer, record["shapes"][method])
    load_trainable(bridge, out_dir / method / BRIDGE_FILE)
    bridge.eval()
    encoder = vision.frozen_encoder(load_file(str(out_dir / ENCODER_FILE)))
    return bridge, PromptFormat(tokenizer), encoder, record
