"""PEFT adapters: build the config, and load a policy whose weights may be a chain of adapters.

Stages save LoRA adapters rather than full copies: ``models/sft`` is an adapter over
``models/base``, ``models/aligned`` an adapter over ``models/sft``. :func:`load_policy` follows
``adapter_config.json``'s ``base_model_name_or_path`` down the chain and merges each adapter
into full-precision weights on the way up (merging into a quantized base would bake the
quantization error into the update; we never do).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from peft import LoraConfig, PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from components.models.loading import NEW_TOKENS_FILE, load_causal_lm, require_dir
from components.params import PeftConfig

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter(path: Path | str) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def new_token_ids(base_dir: Path | str) -> list[int]:
    """Ids the ``base`` stage added to the vocabulary of ``base_dir`` (role tokens for a model without
    a chat template): their embedding rows start untrained."""
    path = Path(base_dir) / NEW_TOKENS_FILE
    return json.loads(path.read_text())["token_ids"] if path.is_file() else []


def lora_config(
    cfg: PeftConfig, task_type: str = "CAUSAL_LM", new_tokens: Sequence[int] = (), tied: bool = False
) -> LoraConfig | None:
    """The PEFT config for ``cfg`` (``None`` for a full fine-tune).

    ``new_tokens``: rows of the input embedding that are new (:func:`new_token_ids`), which LoRA
    alone would leave untrained. Unless ``modules_to_save`` already trains the embedding:

    - untied embeddings: exactly those rows train (PEFT's ``trainable_token_indices``), so the
      embedding stays frozen and the adapter small (the new tokens are role markers, only ever
      inputs: their output rows need no training);
    - tied embeddings (``tied``): the whole input embedding trains (``modules_to_save``, kept
      tied), because PEFT then wraps the output layer too, and TRL 1.16's SFT loss reads the
      output layer's plain ``weight`` (its fused, chunked LM head), which a trainable-tokens
      wrapper does not carry.
    """
    if cfg.method == "none":
        return None
    modules = list(cfg.modules_to_save)
    rows = None
    if new_tokens and "embed_tokens" not in modules:
        if tied:
            modules.append("embed_tokens")
        else:
            rows = {"embed_tokens": list(new_tokens)}
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        modules_to_save=modules or None,
        trainable_token_indices=rows,
        ensure_weight_tying=tied and bool(modules),
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
