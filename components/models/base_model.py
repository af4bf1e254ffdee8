"""The ``base`` stage's component: the tiny model, a bundled real model, or any causal LM (Hub id, path)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from components.models import bundled, tiny
from components.models.loading import load_causal_lm, load_tokenizer
from components.params import BaseConfig


def ensure_chat_template(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Give a tokenizer without a chat template ours (adding its role tokens), so SFT can mask turns.

    Returns the ids of the tokens added to the vocabulary (their embedding rows are new and
    untrained: SFT trains exactly those rows, see :func:`components.peft.adapters.lora_config`).
    """
    if tokenizer.chat_template:
        return []
    before = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": list(tiny.ROLE_TOKENS)})
    if tokenizer.eos_token is None:
        tokenizer.add_special_tokens({"eos_token": tiny.EOS})
        tokenizer.pad_token = tokenizer.pad_token or tiny.EOS
    tokenizer.chat_template = tiny.CHAT_TEMPLATE.replace("<|end|>", tokenizer.eos_token)
    if len(tokenizer) > before:
        model.resize_token_embeddings(len(tokenizer))
    return list(range(before, len(tokenizer)))


def model_source(model: str) -> Path | None:
    """The file or directory ``base.model`` is read from, when it is local (a lineage input), else None."""
    if model == "tiny":
        return None
    if bundled.is_bundled(model):
        return bundled.gguf_path(model)
    path = Path(model)
    return path if path.exists() else None


def build_base(
    cfg: BaseConfig, corpus: Sequence[str]
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, list[int]]:
    """(model, tokenizer, ids of tokens added to its vocabulary) for ``cfg.model``.

    The tiny model comes untrained (its vocabulary is all new, and trained from scratch by
    :func:`components.training.pretrain.pretrain`: no ids are reported). A bundled name
    (:data:`components.models.bundled.BUNDLED`) loads its cached conversion.
    """
    if cfg.model == "tiny":
        tokenizer = tiny.build_tokenizer(corpus, cfg.vocab_size)
        return tiny.build_model(cfg, tokenizer), tokenizer, []
    source = bundled.resolve(cfg.model) if bundled.is_bundled(cfg.model) else cfg.model
    tokenizer = load_tokenizer(source)
    model = load_causal_lm(source)
    return model, tokenizer, ensure_chat_template(model, tokenizer)
