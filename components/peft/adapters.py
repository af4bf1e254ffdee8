"""PEFT adapters: build the config, and load a policy whose weights may be a chain of adapters.

Stages save LoRA adapters rather than full copies: ``models/sft`` is an adapter over
``models/base``, ``models/aligned`` an adapter over ``models/sft``. :func:`load_policy` follows
``adapter_config.json``'s ``base_model_name_or_path`` down the chain and merges each adapter
into full-precision weights on the way up (merging into a quantized base would bake the
quantization error into the update; we never do).
"""

from __future__ import annotations

import json
from pathlib import Path

from peft import LoraConfig, PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from components.models.loading import load_causal_lm, require_dir
from components.params import PeftConfig

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter(path: Path | str) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def lora_config(cfg: PeftConfig, task_type: str = "CAUSAL_LM") -> LoraConfig | None:
    """The PEFT config for ``cfg`` (``None`` for a full fine-tune)."""
    if cfg.method == "none":
        return None
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        modules_to_save=list(cfg.modules_to_save) or None,
        task_type=task_type,
    )


def adapter_base(path: Path | str) -> str:
    return json.loads((Path(path) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]


def set_adapter_base(path: Path | str, base: Path | str) -> None:
    """Record the base an adapter applies to (a path relative to the project root), deterministically."""
    cfg_path = Path(path) / ADAPTER_CONFIG
    data = json.loads(cfg_path.read_text())
    data["base_model_name_or_path"] = str(base)
    # PEFT writes target_modules from a set, in hash order: sort it so equal runs give equal bytes.
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
    cfg_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_policy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path, base: Path
) -> None:
    """Save a trained policy (adapter or full weights) with its tokenizer; an adapter records ``base``."""
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    if is_adapter(out_dir):
        set_adapter_base(out_dir, base)


def load_policy(path: Path | str) -> PreTrainedModel:
    """A full-precision causal LM for ``path``, merging any chain of adapters beneath it."""
    path = require_dir(path, "model")
    if not is_adapter(path):
        return load_causal_lm(path)
    base = load_policy(adapter_base(path))
    merged = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    merged.eval()
    return merged
