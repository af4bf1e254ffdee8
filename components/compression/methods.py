"""``compress.method``: which methods exist, and one loader that reads what a compress output is.

Every compress output directory names its method in ``config.yaml`` (written by the stage's
``describe_output``), and :func:`load_compressed` dispatches on it, so no caller sniffs files:

- ``int8_weight`` / ``int4_weight`` / ``int8_dynamic``: quantized weights beside ``config.json``
  (:mod:`components.compression.quantize`);
- ``bitdelta``: one sign bit per weight of the fine-tune's delta plus one scale per matrix
  (:mod:`components.compression.bitdelta`); it needs the model it was built on (the SFT policy
  by default), found at the path ``bitdelta.json`` records (or passed as ``base=``) and
  checked by hash;
- ``prune``: unstructured or N:M pruned weights in ``model.sparse.safetensors`` (kept values +
  a packed bitmask), or a structurally smaller model as a plain transformers checkpoint
  (:mod:`components.compression.prune`);
- ``distill``: the student, a plain transformers checkpoint;
- ``nf4`` / ``llm_int8``: a bitsandbytes-quantized transformers checkpoint, whose
  ``config.json`` carries the ``quantization_config`` (:mod:`components.compression.bnb`);
- ``none``: the merged full-precision model in ``merged/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from torch import nn

from components.compression.quantize import (
    INT8_FILE,
    QUANTIZATIONS,
    WEIGHT_ONLY,
    _check_format,
    load_int8,
    load_weight_only,
)

METHODS = (*QUANTIZATIONS, "nf4", "llm_int8", "bitdelta", "prune", "distill", "none")
BITDELTA_BASE_FILE = "bitdelta.json"


def compressed_method(model_dir: Path | str) -> str:
    """The method a compress output was written with: ``method`` in its ``config.yaml``."""
    path = Path(model_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found, so the compressed model's format is unknown")
    method = (yaml.safe_load(path.read_text()) or {}).get("method")
    if method not in METHODS:
        raise ValueError(f"{path}: method {method!r} is not one of {', '.join(METHODS)}")
    return method


def bitdelta_base_path(model_dir: Path | str) -> Path:
    """The base model directory a Bit-Delta output was built on (as ``bitdelta.json`` records it)."""
    path = Path(model_dir) / BITDELTA_BASE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found, so the Bit-Delta's base model is unknown")
    return Path(json.loads(path.read_text())["base_model"])


def load_compressed(
    model_dir: Path | str, method: str | None = None, base: nn.Module | Path | str | None = None
) -> nn.Module:
    """The runnable compressed model in ``model_dir``, loaded as its ``config.yaml`` says.

    ``method`` overrides ``config.yaml`` (the compress stage passes it to measure fidelity on the
    saved files before it writes ``config.yaml``). ``base`` is the base model (or its directory)
    a ``bitdelta`` output adds its deltas to; by default the directory ``bitdelta.json`` names.
    A base with other weights than the delta was made for is refused (hash check).
    """
    from components.models.loading import load_causal_lm

    model_dir = Path(model_dir)
    method = method or compressed_method(model_dir)
    if method in WEIGHT_ONLY:
        return load_weight_only(model_dir, method)
    if method == "int8_dynamic":
        _check_format(model_dir / INT8_FILE, "int8_dynamic")
        return load_int8(model_dir)
    if method == "bitdelta":
        from components.compression.bitdelta import load_bitdelta

        if base is None:
            base = bitdelta_base_path(model_dir)
        from components.peft.adapters import load_policy

        base_model = load_policy(base) if isinstance(base, (Path, str)) else base  # sft: an adapter
        return load_bitdelta(model_dir, base_model).eval()
    if method == "prune":
        from components.compression.prune import SPARSE_FILE, load_sparse

        # magnitude / n_m write the sparse file; mlp_channels a smaller ordinary checkpoint
        return load_sparse(model_dir) if (model_dir / SPARSE_FILE).is_file() else load_causal_lm(model_dir)
    if method == "distill":
        return load_causal_lm(model_dir)
    if method in ("nf4", "llm_int8"):
        from components.compression.bnb import load_bnb

        return load_bnb(model_dir)
    if method == "none":
        return load_causal_lm(model_dir / "merged")
    raise ValueError(f"unknown compress.method {method!r} (known: {', '.join(METHODS)})")
