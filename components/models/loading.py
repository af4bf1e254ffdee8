"""Load and save models and tokenizers by path: the one way every stage touches weights.

Weights are safetensors, ``trust_remote_code`` stays off, and nothing is fetched at run time
unless the user names a Hub id as ``base.model`` (and allows the network).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from components.errors import MissingInputError

# Written by the ``base`` stage next to the weights: ids it added to the vocabulary (untrained rows).
NEW_TOKENS_FILE = "posttrain_new_tokens.json"


def require_dir(path: Path | str, what: str) -> Path:
    """Fail with one clear line when an input model/data directory is missing."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{path}: {what} not found (run the upstream stage first: `dvc repro`)")
    return path


def load_tokenizer(path: Path | str) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: Path | str) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, trust_remote_code=False)
    model.eval()
    return model


def load_sequence_classifier(path: Path | str) -> PreTrainedModel:
    """The causal LM at ``path`` with a scalar sequence-classification head (new unless saved), in fp32."""
    return AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=1, dtype=torch.float32, trust_remote_code=False
    )


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path | str) -> None:
    """``save_pretrained`` for both, safetensors only."""
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def param_count(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def dir_size(path: Path | str, pattern: str = "*.safetensors") -> int:
    """Bytes of the weight files in a model directory (or an adapter's: its size on disk)."""
    return sum(p.stat().st_size for p in Path(path).glob(pattern))
