"""Adapters on disk: save a trained policy, and load one whose weights may be a chain of adapters.

Stages save adapters rather than full copies: ``models/sft`` is an adapter over ``models/base``,
``models/aligned`` an adapter over ``models/sft``. :func:`load_policy` follows each adapter's
recorded base down the chain and merges each adapter into full-precision weights on the way up
(merging into a quantized base would bake the quantization error into the update; we never do).
Each adapter also records a hash of its base's weights, so one loaded over another base fails
with one line instead of a shape error or, worse, silently wrong outputs.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from components.distributed import resolve_compute
from components.errors import PosttrainError
from components.models.loading import NEW_TOKENS_FILE, load_causal_lm, load_sequence_classifier, require_dir
from components.params import ComputeConfig, PeftConfig
from components.peft.custom import (
    CUSTOM_CONFIG,
    CUSTOM_METHODS,
    attach_custom,
    merge_biases,
    read_custom_config,
    save_custom,
)
from components.peft.methods import TrainablePolicy, load_quantized, prepare, trainable_names

ADAPTER_CONFIG = "adapter_config.json"
BASE_RECORD = "base_model.json"
NOT_MERGEABLE = ("prefix", "prompt", "adapter", "tinytl")


class AdapterBaseMismatch(PosttrainError):
    """An adapter loaded over a base model other than the one it was trained on."""


class NotMergeableError(PosttrainError):
    """A step that needs plain weights was given an adapter that cannot merge into them."""


def is_adapter(path: Path | str) -> bool:
    """An adapter directory: PEFT's (``adapter_config.json``) or one of ours (``posttrain_peft.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file() or (Path(path) / CUSTOM_CONFIG).is_file()


def adapter_method(path: Path | str) -> str:
    """The ``peft.method`` that trained the adapter at ``path`` (``full`` for plain weights)."""
    path = Path(path)
    if (path / CUSTOM_CONFIG).is_file():
        return read_custom_config(path)["method"]
    if not (path / ADAPTER_CONFIG).is_file():
        return "full"
    data = json.loads((path / ADAPTER_CONFIG).read_text())
    kind = str(data.get("peft_type", "LORA")).upper()
    if kind == "LORA":
        return "dora" if data.get("use_dora") else "lora"
    return {"IA3": "ia3", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt"}.get(kind, kind.lower())


def new_token_ids(base_dir: Path | str) -> list[int]:
    """Ids the ``base`` stage added to the vocabulary of ``base_dir`` (role tokens for a model without
    a chat template): their embedding rows start untrained."""
    path = Path(base_dir) / NEW_TOKENS_FILE
    return json.loads(path.read_text())["token_ids"] if path.is_file() else []


def adapter_base(path: Path | str) -> str:
    path = Path(path)
    if (path / CUSTOM_CONFIG).is_file():
        return read_custom_config(path)["base_model_name_or_path"]
    return json.loads((path / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]


def set_adapter_base(path: Path | str, base: Path | str) -> None:
    """Record the base an adapter applies to (a path relative to the project root), deterministically."""
    cfg_path = Path(path) / ADAPTER_CONFIG
    data = json.loads(cfg_path.read_text())
    data["base_model_name_or_path"] = str(base)
    # PEFT writes target_modules from a set, in hash order: sort it so equal runs give equal bytes.
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
    cfg_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def weights_fingerprint(model_dir: Path | str) -> str:
    """sha256 over a model directory's weight files (plain or adapter), in name order."""
    digest = hashlib.sha256()
    for file in sorted(Path(model_dir).iterdir()):
        if file.suffix in (".safetensors", ".bin") and file.is_file():
            digest.update(file.name.encode())
            with file.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def record_base(out_dir: Path | str, base: Path | str) -> None:
    """Write which weights ``out_dir`` was trained over, so loading it over others fails loudly."""
    record = {"path": str(base), "sha256": weights_fingerprint(base)}
    (Path(out_dir) / BASE_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def check_base(adapter_dir: Path | str, base_dir: Path | str, base_hash: str = "") -> None:
    """Raise :class:`AdapterBaseMismatch` unless ``base_dir`` holds the weights the adapter was trained on.

    ``base_hash``: ``weights_fingerprint(base_dir)`` when the caller already has it."""
    record_path = Path(adapter_dir) / BASE_RECORD
    if not record_path.is_file():
        return  # saved before records were kept
    record = json.loads(record_path.read_text())
    found = base_hash or weights_fingerprint(base_dir)
    if found != record["sha256"]:
        raise AdapterBaseMismatch(
            f"{adapter_dir}: trained over base weights {record['sha256'][:12]} ({record['path']}), but "
            f"{base_dir} holds {found[:12]}: load it over its own base (or retrain it on this one)"
        )


def save_policy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    base: Path,
    peft: PeftConfig | None = None,
) -> None:
    """Save a trained policy with its tokenizer: full weights, a PEFT adapter, or one of ours.

    An adapter records ``base`` (its path and a hash of its weights, checked when loading)."""
    if peft is not None and peft.method in CUSTOM_METHODS:
        save_custom(model, out_dir, peft.method, getattr(peft, peft.method), base, trainable_names(model))
    else:
        model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    if (Path(out_dir) / ADAPTER_CONFIG).is_file():
        set_adapter_base(out_dir, base)
    if is_adapter(out_dir):
        record_base(out_dir, base)


def load_policy(path: Path | str, attached_ok: bool = False, base: Path | str | None = None) -> Any:
    """A full-precision causal LM for ``path``, merging any chain of adapters beneath it.

    Merges always go onto full-precision weights (a QLoRA adapter onto the fp32 base it was
    quantized from). An adapter that cannot merge (prefix, prompt, adapter, tinytl) stays
    attached when ``attached_ok`` (generation works through it); otherwise that is an error
    naming ``peft.method``, never a silent no-op merge. ``base``: load the adapter over this
    directory instead of the one it records (checked to hold the same weights).
    """
    path = require_dir(path, "model")
    if not is_adapter(path):
        return load_causal_lm(path)
    method = adapter_method(path)
    if method in NOT_MERGEABLE and not attached_ok:
        raise NotMergeableError(
            f"{path} is a {method} adapter (peft.method: {method}), which cannot merge into plain weights, "
            "and this step needs plain weights; train that stage with peft.method full, lora, dora, "
            "qlora, ia3 or bitfit"
        )
    base_dir = Path(base) if base is not None else Path(adapter_base(path))
    check_base(path, base_dir)
    base_model = load_policy(base_dir)
    if method in CUSTOM_METHODS:
        model = attach_custom(base_model, path)
        return merge_biases(model) if method == "bitfit" else model
    loaded = PeftModel.from_pretrained(base_model, str(path))
    if method in NOT_MERGEABLE:
        loaded.eval()
        return loaded
    merged = loaded.merge_and_unload()
    merged.eval()
    return merged


@contextmanager
def plain_weights(source: Path, scratch: Path | str | None = None) -> Iterator[Path]:
    """A directory of full-precision weights for ``source``: itself, or (an adapter chain) its merge
    saved to a temporary directory under ``scratch`` (when that exists) for a re-load."""
    if not is_adapter(source):
        yield source
        return
    where = str(scratch) if scratch and Path(scratch).is_dir() else None
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        load_policy(source).save_pretrained(tmp, safe_serialization=True)
        yield Path(tmp)


def load_trainable(
    source: Path | str,
    cfg: PeftConfig,
    key: str,
    *,
    compute: ComputeConfig | None = None,
    reward_head: bool = False,
    new_tokens: Sequence[int] = (),
    seed: int = 0,
    scratch: Path | str | None = None,
) -> TrainablePolicy:
    """The model a training stage starts from (``source``: weights or an adapter chain), set up for ``cfg``.

    ``compute`` picks the device as the trainers do (:func:`components.distributed.resolve_compute`).
    ``reward_head``: a sequence-classification model with a fresh scalar head (the reward model).
    QLoRA re-loads the merged full-precision weights in 4-bit through bitsandbytes.
    """
    device, _ = resolve_compute(compute or ComputeConfig())
    source = Path(source)
    quantize = cfg.method == "qlora"
    facts: dict[str, float] = {}
    if reward_head or quantize:
        with plain_weights(source, scratch) as plain:
            model = (
                load_quantized(plain, cfg, device, reward_head, key)
                if quantize
                else load_sequence_classifier(plain)
            )
        if quantize:
            facts["quantized_weight_bytes_ratio"] = quantized_ratio(model)
    else:
        model = load_policy(source)
    policy = prepare(
        model,
        cfg,
        key,
        task_type="SEQ_CLS" if reward_head else "CAUSAL_LM",
        new_tokens=new_tokens,
        tokenizer_path=source,
        seed=seed,
    )
    policy.facts |= facts
    policy.device = device
    if quantize:
        from components.compression.bnb import compute_dtype

        policy.adapter_dtype = compute_dtype(device)
    return policy


def quantized_ratio(model: torch.nn.Module) -> float:
    """Bytes of the 4-bit Linear weights (with their quantization constants) over the same weights in fp16."""
    from components.compression.bnb import quantized_weight_bytes

    quantized, fp16 = quantized_weight_bytes(model)
    return quantized / fp16
