"""bitsandbytes quantization, loaded the transformers way: ``nf4`` and ``llm_int8``.

Two ``compress.method`` values; both quantize the merged full-precision checkpoint while
``AutoModelForCausalLM.from_pretrained`` loads it (a ``BitsAndBytesConfig``), and both are saved
with ``save_pretrained``: ``model.safetensors`` holds the quantized tensors and ``config.json``
their ``quantization_config``, which is all :func:`load_bnb` needs to rebuild the model.

``nf4``: 4-bit NormalFloat with double quantization (QLoRA's format). Two weights per byte, one
absmax per block of 64 weights, and those absmaxes themselves quantized to uint8 (one fp32 scale
per 256 of them): 4.13 bits per weight, 25.8% of fp16. Computes in fp32 on the CPU, bf16 on CUDA.

``llm_int8``: LLM.int8(). int8 weights with one fp32 scale per output row (``SCB``); activations
are quantized per row on the fly, except input columns holding a value above
``llm_int8_threshold`` (6.0), which are multiplied in fp16: the outlier handling that keeps one
large activation from stretching every other value's scale.

The LM head stays in full precision (``llm_int8_skip_modules=["lm_head"]``), and a head tied to
the input embeddings stays tied: transformers never quantizes ``nn.Embedding``.

Measured on bitsandbytes 0.50.2 with the CPU backend (transformers 5.23): quantizing, saving and
reloading both methods works with ``device_map={"": "cpu"}``; the reloaded model's logits equal
the in-memory quantized model's exactly.

**The CPU repack trap.** On a CPU with AVX512-BF16, ``Linear4bit``'s first forward in eval mode
on a no-grad input repacks its weight for a fused bf16 kernel (``support_avx512bf16_for_cpu``).
For inference alone that is not harmless: (1) the layer then computes in bf16, not in the
configured fp32 (logits move by up to 0.05 on the unit tests' model, KL 3e-5); (2)
``save_pretrained`` unpacks it and re-quantizes the absmaxes from their bf16 copy, so a model
saved after a forward is not the one that was quantized (its reload is 0.04 off); (3) a layer
whose ``out_features`` 32 does not divide fails outright (``AssertionError: N must be divisible
by block_n``); (4) LoRA gradients through a repacked layer are silently zero (INSTALL-NOTES).
:func:`quantize_bnb` and :func:`load_bnb` therefore switch it off on every ``Linear4bit``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from types import ModuleType

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from components.errors import PosttrainError

BNB_METHODS = ("nf4", "llm_int8")
LLM_INT8_THRESHOLD = 6.0
SKIP_MODULES = ("lm_head",)
QUANT_STATE_KEY = "quant_state.bitsandbytes__"  # 4-bit: "<layer>.weight.quant_state.bitsandbytes__nf4"
NESTED_OFFSET_BYTES = 4  # double quant's one fp32 offset per tensor, kept in the quant_state JSON


class BnbUnavailableError(PosttrainError):
    """bitsandbytes cannot be imported, or cannot quantize on this machine."""


# ----------------------------------------------------------------- configuration


def _check_method(method: str) -> None:
    if method not in BNB_METHODS:
        raise ValueError(f"unknown bitsandbytes compress.method {method!r} (known: {', '.join(BNB_METHODS)})")


def compute_dtype(device: str) -> torch.dtype:
    """fp32 on the CPU (its bf16 matmuls are slow, and the fused bf16 path is off), else bf16."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def bnb_config(
    method: str,
    device: str = "cpu",
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    skip_modules: Sequence[str] = SKIP_MODULES,
) -> BitsAndBytesConfig:
    """The ``BitsAndBytesConfig`` for ``compress.method``; its ``to_dict()`` lands in ``config.json``.

    ``nf4`` is the 4-bit family (QLoRA's base too: ``quant_type`` nf4 or fp4, ``double_quant``);
    ``skip_modules`` stay in full precision (the head; a reward model's ``score`` as well)."""
    _check_method(method)
    if method == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=compute_dtype(device),
            llm_int8_skip_modules=list(skip_modules),
        )
    return BitsAndBytesConfig(
        load_in_8bit=True, llm_int8_threshold=LLM_INT8_THRESHOLD, llm_int8_skip_modules=list(SKIP_MODULES)
    )


def require_bnb(method: str, device: str = "cpu", setting: str = "") -> ModuleType:
    """``bitsandbytes``, once a 64-value probe has quantized on ``device``; else one clear line.

    transformers' own failures here are an ImportError about a pip install, or a RuntimeError
    listing devices, raised from deep inside ``from_pretrained``; this says which setting needs it
    (``setting``, default ``compress.method: <method>``).
    """
    setting = setting or f"compress.method: {method}"
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise BnbUnavailableError(f"{setting} needs bitsandbytes, which cannot be imported: {exc}") from exc
    probe = torch.linspace(-1.0, 1.0, 64)
    try:
        probe = probe.to(device)
        if method == "nf4":
            bnb.functional.quantize_4bit(probe, blocksize=64, quant_type="nf4", compress_statistics=True)
        else:
            bnb.functional.int8_vectorwise_quant(probe.reshape(1, -1).half())
    except Exception as exc:  # noqa: BLE001 - any failure means the same thing: not on this machine
        version = getattr(bnb, "__version__", "?")
        raise BnbUnavailableError(
            f"{setting}: bitsandbytes {version} cannot quantize on {device}: {type(exc).__name__}: {exc}"
        ) from exc
    return bnb


# ----------------------------------------------------------------- quantize, save, load


def disable_cpu_repack(model: nn.Module) -> int:
    """Switch off ``Linear4bit``'s AVX512-BF16 repack (see the module docstring); the layers changed."""
    import bitsandbytes as bnb

    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def _check_head_kept(model: PreTrainedModel, method: str) -> None:
    """The output embeddings must stay a full-precision ``nn.Linear`` (the skip list names ``lm_head``)."""
    head = model.get_output_embeddings()
    if head is not None and type(head) is not nn.Linear:
        raise ValueError(
            f"compress.method: {method}: the LM head was quantized ({type(head).__name__}); "
            f"this model's head is not named {SKIP_MODULES[0]!r}"
        )


def quantize_bnb(merged_dir: Path | str, method: str, device: str = "cpu") -> PreTrainedModel:
    """The merged full-precision checkpoint in ``merged_dir``, quantized with ``method`` as it loads.

    In eval mode, on ``device``, with the CPU repack switched off. Non-quantized parts (embeddings,
    norms, the head) are kept in the compute dtype: fp32 on the CPU.
    """
    _check_method(method)
    require_bnb(method, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(merged_dir),
            quantization_config=bnb_config(method, device),
            dtype=compute_dtype(device),
            device_map={"": device},
            trust_remote_code=False,
        )
    except ImportError as exc:  # accelerate missing, or transformers' own bitsandbytes check
        raise BnbUnavailableError(f"compress.method: {method}: {exc}") from exc
    _check_head_kept(model, method)
    disable_cpu_repack(model)
    return model.eval()


def save_bnb(model: PreTrainedModel, out_dir: Path | str) -> Path:
    """``save_pretrained`` the quantized model into ``out_dir`` (safetensors); the weights file's path.

    The file holds the quantized tensors themselves (nf4: packed uint8 + absmax/quant_state;
    llm_int8: int8 + ``SCB``), and ``config.json`` the ``quantization_config`` that reloads them.
    """
    if getattr(model.config, "quantization_config", None) is None:
        raise ValueError(f"{out_dir}: refusing to save a model without a quantization_config as bitsandbytes")
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir / "model.safetensors"


def bnb_method(model_dir: Path | str) -> str:
    """``nf4`` or ``llm_int8``: what the ``quantization_config`` in ``model_dir/config.json`` says."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found, so no bitsandbytes model is there")
    qcfg = json.loads(path.read_text()).get("quantization_config") or {}
    if qcfg.get("quant_method") != "bitsandbytes":
        raise ValueError(f"{path}: no bitsandbytes quantization_config (found {qcfg.get('quant_method')!r})")
    if qcfg.get("load_in_8bit"):
        return "llm_int8"
    if qcfg.get("load_in_4bit") and qcfg.get("bnb_4bit_quant_type") == "nf4":
        return "nf4"
    raise ValueError(f"{path}: a bitsandbytes config that is neither nf4 nor llm_int8")


def load_bnb(model_dir: Path | str, device: str = "cpu") -> PreTrainedModel:
    """Reload a :func:`save_bnb` directory (its ``quantization_config`` drives it), in eval mode."""
    method = bnb_method(model_dir)
    require_bnb(method, device)
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=compute_dtype(device), device_map={"": device}, trust_remote_code=False
    )
    disable_cpu_repack(model)
    return model.eval()


# ----------------------------------------------------------------- size accounting
# Counted: the packed/int8 weights and the constants each layer needs to dequantize them (nf4:
# uint8 absmax per 64 weights, fp32 nested absmax per 256 blocks, one fp32 offset; llm_int8: fp32
# SCB per row). Not counted: nf4's two code books (the 16-value NF4 table and the 256-value
# dynamic map for the absmaxes), which are the same constants for every layer; bitsandbytes
# nevertheless writes a copy per layer, 1.1 KB, which the file size (``dir_size``) does include.


def _module_weight_bytes(model: nn.Module) -> tuple[int, int]:
    import bitsandbytes as bnb

    quantized = fp16 = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            quantized += module.weight.nbytes + state.absmax.nbytes
            if state.nested:
                quantized += state.state2.absmax.nbytes + NESTED_OFFSET_BYTES
            fp16 += 2 * int(torch.Size(state.shape).numel())
        elif isinstance(module, bnb.nn.Linear8bitLt):
            scb = getattr(module.weight, "SCB", None)
            if scb is None:
                scb = module.state.SCB
            quantized += module.weight.nbytes + (scb.nbytes if scb is not None else 0)
            fp16 += 2 * module.weight.numel()
    return quantized, fp16


def _file_weight_bytes(model_dir: Path) -> tuple[int, int]:
    paths = sorted(model_dir.glob("*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights")
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(p), "pt")) for p in paths]
        where = {key: fh for fh in handles for key in fh.keys()}

        def nbytes(key: str) -> int:
            return where[key].get_tensor(key).nbytes if key in where else 0

        quantized = fp16 = 0
        for key in where:
            if QUANT_STATE_KEY in key:  # <layer>.weight.quant_state.bitsandbytes__nf4
                weight = key[: key.index("." + QUANT_STATE_KEY)]
                state = json.loads(bytes(where[key].get_tensor(key).tolist()))
                quantized += nbytes(weight) + nbytes(f"{weight}.absmax") + nbytes(f"{weight}.nested_absmax")
                quantized += NESTED_OFFSET_BYTES if "nested_offset" in state else 0
                fp16 += 2 * int(torch.Size(state["shape"]).numel())
            elif key.endswith(".SCB"):  # <layer>.SCB beside the int8 <layer>.weight
                weight = key.removesuffix("SCB") + "weight"
                quantized += nbytes(weight) + nbytes(key)
                fp16 += 2 * where[weight].get_tensor(weight).numel()
    return quantized, fp16


def quantized_weight_bytes(model_or_dir: nn.Module | Path | str) -> tuple[int, int]:
    """(bytes of the quantized linear weights with their constants, the same weights' bytes in fp16).

    From a loaded model or a :func:`save_bnb` directory (the two agree). Their ratio is
    ``quantized_weight_bytes_ratio``: 0.258 for nf4 (4 bits + 8 per 64 + 32 per 16384, over 16),
    0.5 + 2 / in_features for llm_int8. Layers kept in full precision (the head) count in neither.
    """
    if isinstance(model_or_dir, nn.Module):
        quantized, fp16 = _module_weight_bytes(model_or_dir)
        what = type(model_or_dir).__name__
    else:
        quantized, fp16 = _file_weight_bytes(Path(model_or_dir))
        what = str(model_or_dir)
    if fp16 == 0:
        raise ValueError(f"{what}: no bitsandbytes-quantized linear layers to measure")
    return quantized, fp16
