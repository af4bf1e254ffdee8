"""Post-training quantization: weight-only int8 and int4, and PyTorch's dynamic int8.

Three methods (``compress.method``), each stored in safetensors (no pickle) beside
``config.json`` with a ``format`` tag in the file's metadata; the output directory's
``config.yaml`` names the method and :func:`components.compression.methods.load_compressed`
reads it from there to pick the loader:

``int8_weight`` (the default): weight-only int8, symmetric, one fp32 scale per output channel
(``scale = max|w_row| / 127``, ``q = round(w / scale)`` in [-127, 127]). Activations stay in
full precision and the weight is dequantized in :class:`Int8WeightOnlyLinear`'s forward, so an
activation outlier costs nothing: the only error is the weight rounding, at most ``scale / 2``
per element. Real checkpoints have such outliers (SmolLM2-135M's ``down_proj`` inputs reach
|x| ~ 3100), which is what broke ``int8_dynamic``. A linear layer whose weight is tied to the
input embeddings (``lm_head`` in SmolLM2) stays tied and in full precision.

``int4_weight``: weight-only int4, symmetric per group of 32 input columns (one fp32 scale per
group; a row that 32 does not divide gets one scale), two values packed per byte, so the file
really is half of int8's. torchao's CPU int4 stores one value per int8 byte, and its packed
``Int4WeightOnlyConfig`` needs CUDA; hence our own packing.

``int8_dynamic``: PyTorch's dynamic quantization of every ``nn.Linear`` (int8 weights with
per-output-channel scales, activations quantized per tensor on the fly). Fast int8 matmuls on
any CPU, but one outlier in a layer's input stretches that layer's activation scale: 1.24
nats/token of KL on SmolLM2-135M, against 0.009 on the tiny model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantLinear
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

INT8_FILE = "model.int8.safetensors"
INT4_FILE = "model.int4.safetensors"
FORMATS = {
    "int8_weight": "posttrain-int8-weight",
    "int8_dynamic": "posttrain-dynamic-int8",
    "int4_weight": "posttrain-int4-weight",
}
QUANTIZATIONS = tuple(FORMATS)
INT4_GROUP_SIZE = 32


# ----------------------------------------------------------------- int8_weight (weight-only)


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, fp32 scale per row): ``scale = max|row| / 127``, ``q = round(w / scale)``.

    An all-zero row gets scale 1 (its int8 row is zero either way), so nothing divides by zero.
    """
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8WeightOnlyLinear(nn.Module):
    """``nn.Linear`` with an int8 weight and one fp32 scale per output channel; dequantizes in forward."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8WeightOnlyLinear:
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        module.qweight, module.scale = quantize_int8_per_channel(linear.weight)
        if linear.bias is not None:
            module.bias = linear.bias.detach().float().clone()
        return module

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantize().to(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


def _replace_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    """Swap every ``nn.Linear`` (except one tied to the input embeddings) for ``make(linear)``, in place."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    tied = embeddings.weight if embeddings is not None else None
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and module.weight is not tied
    ]
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, make(module))
    return model


def quantize_int8_weight(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` weight-only int8 quantized (``model`` untouched)."""
    return _replace_linears(copy.deepcopy(model), Int8WeightOnlyLinear.from_linear).eval()


def _check_format(path: Path, quantization: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no quantized weights (compress.method: {quantization})")
    with safe_open(str(path), "pt") as fh:
        found = (fh.metadata() or {}).get("format")
    if found != FORMATS[quantization]:
        raise ValueError(f"{path}: format {found!r}, but it is loaded as compress.method: {quantization}")


# ----------------------------------------------------------------- int4_weight (packed, grouped)


def int4_group_size(in_features: int, group_size: int = INT4_GROUP_SIZE) -> int:
    """``group_size`` when it divides the row, else the whole row (one scale per output channel)."""
    return group_size if in_features % group_size == 0 else in_features


def quantize_int4_groups(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 ``[out, ceil(in / 2)]``, fp32 scales ``[out, in / group_size]``).

    Symmetric per group of ``group_size`` input columns: ``scale = max|w| / 7``, ``q = round(w /
    scale)`` in [-8, 7], stored as ``q + 8`` in a nibble; column ``2j`` in the low nibble of byte
    ``j``, column ``2j + 1`` in the high one. Two weights per byte, so the file really is half
    of int8 (torchao's CPU int4 keeps one value per int8 byte; this is why we pack ourselves).
    """
    w = weight.detach().float()
    out_features, in_features = w.shape
    groups = w.reshape(out_features, in_features // group_size, group_size)
    amax = groups.abs().amax(dim=2)
    scale = torch.where(amax > 0, amax / 7, torch.ones_like(amax))
    q = torch.round(groups / scale[:, :, None]).clamp_(-8, 7).reshape(out_features, in_features)
    nibbles = (q + 8).to(torch.uint8)
    if in_features % 2:
        nibbles = F.pad(nibbles, (0, 1), value=8)
    packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return packed.contiguous(), scale


def dequantize_int4_groups(packed: torch.Tensor, scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`quantize_int4_groups`: the fp32 weight ``[out, in_features]``."""
    low, high = (packed & 0x0F).to(torch.int8), (packed >> 4).to(torch.int8)
    q = torch.stack((low, high), dim=2).reshape(packed.shape[0], -1)[:, :in_features] - 8
    group_size = in_features // scale.shape[1]
    rows = q.shape[0]
    return (q.float().reshape(rows, -1, group_size) * scale[:, :, None]).reshape(rows, in_features)


class Int4WeightOnlyLinear(nn.Module):
    """``nn.Linear`` with two packed int4 weights per byte and one fp32 scale per group of inputs."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        groups = in_features // int4_group_size(in_features)
        self.register_buffer("qweight", torch.zeros(out_features, (in_features + 1) // 2, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, groups))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int4WeightOnlyLinear:
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        module.qweight, module.scale = quantize_int4_groups(
            linear.weight, int4_group_size(linear.in_features)
        )
        if linear.bias is not None:
            module.bias = linear.bias.detach().float().clone()
        return module

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4_groups(self.qweight, self.scale, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantize().to(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.in_features // self.scale.shape[1]}, bias={self.bias is not None}"
        )


def quantize_int4_weight(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` weight-only int4 quantized (``model`` untouched)."""
    return _replace_linears(copy.deepcopy(model), Int4WeightOnlyLinear.from_linear).eval()


# ----------------------------------------------------------------- weight-only files (int8, int4)

WEIGHT_ONLY: dict[str, tuple[type[nn.Module], str]] = {
    "int8_weight": (Int8WeightOnlyLinear, INT8_FILE),
    "int4_weight": (Int4WeightOnlyLinear, INT4_FILE),
}


def save_weight_only(qmodel: nn.Module, out_dir: Path | str, method: str) -> Path:
    """Write an ``int8_weight``/``int4_weight`` model to safetensors (tied tensors once); the path."""
    path = Path(out_dir) / WEIGHT_ONLY[method][1]
    save_model(qmodel, str(path), metadata={"format": FORMATS[method]})
    return path


def load_weight_only(model_dir: Path | str, method: str) -> nn.Module:
    """Rebuild a model saved by :func:`save_weight_only` (architecture from ``config.json``)."""
    module_cls, filename = WEIGHT_ONLY[method]
    model_dir = Path(model_dir)
    path = model_dir / filename
    _check_format(path, method)
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    # Built on the CPU, not the meta device: non-persistent buffers (rotary inv_freq) are not in
    # the file, and to_empty() would leave them uninitialised.
    model = AutoModelForCausalLM.from_config(config)
    shell = _replace_linears(
        model, lambda lin: module_cls(lin.in_features, lin.out_features, lin.bias is not None)
    )
    missing, unexpected = load_model(shell, str(path), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: missing tensors {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    return shell.eval()


def save_int8_weight(qmodel: nn.Module, out_dir: Path | str) -> Path:
    """Write a :func:`quantize_int8_weight` model to safetensors (tied tensors once); returns the path."""
    return save_weight_only(qmodel, out_dir, "int8_weight")


def load_int8_weight(model_dir: Path | str) -> nn.Module:
    """Rebuild the model saved by :func:`save_int8_weight` (architecture from ``config.json``)."""
    return load_weight_only(model_dir, "int8_weight")


# ----------------------------------------------------------------- int8_dynamic


def quantize_int8_dynamic(model: nn.Module) -> nn.Module:
    """Return a dynamically int8-quantized copy of ``model`` (``nn.Linear`` layers only)."""
    return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=False)


def save_int8(qmodel: nn.Module, out_dir: Path | str) -> Path:
    """Write a dynamically quantized model's tensors to safetensors; returns the file path."""
    tensors: dict[str, torch.Tensor] = {}
    quantized_prefixes = []
    for name, module in qmodel.named_modules():
        if isinstance(module, DynamicQuantLinear):
            weight, bias = module._packed_params._weight_bias()
            quantized_prefixes.append(name)
            tensors[f"{name}.qweight"] = weight.int_repr().contiguous()
            if weight.qscheme() == torch.per_channel_affine:
                tensors[f"{name}.scales"] = weight.q_per_channel_scales().float().contiguous()
            else:
                tensors[f"{name}.scales"] = torch.full(
                    (weight.shape[0],), weight.q_scale(), dtype=torch.float32
                )
            if bias is not None:
                tensors[f"{name}.bias"] = bias.detach().contiguous()
    for name, tensor in qmodel.state_dict().items():
        if not isinstance(tensor, torch.Tensor) or tensor.is_quantized:
            continue
        if any(name.startswith(prefix + ".") for prefix in quantized_prefixes):
            continue
        tensors[name] = tensor.detach().contiguous()
    path = Path(out_dir) / INT8_FILE
    save_file(tensors, str(path), metadata={"format": FORMATS["int8_dynamic"]})
    return path


def load_int8(model_dir: Path | str) -> nn.Module:
    """Rebuild the quantized model saved by :func:`save_int8` (config from ``config.json``)."""
    model_dir = Path(model_dir)
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    # Built on the CPU, not the meta device: non-persistent buffers (rotary inv_freq) are not in
    # the state dict, and to_empty() would leave them uninitialised.
    model = AutoModelForCausalLM.from_config(config)
    tensors = load_file(str(model_dir / INT8_FILE))
    float_state = {k: v for k, v in tensors.items() if not k.endswith((".qweight", ".scales"))}
    missing = model.load_state_dict(float_state, strict=False).missing_keys
    quantized = tuple(k[: -len("qweight")] for k in tensors if k.endswith(".qweight"))
    unexplained = [k for k in missing if not k.startswith(quantized)]
    if unexplained:
        raise ValueError(f"{model_dir / INT8_FILE}: missing tensors {unexplained[:3]}")
    qmodel = quantize_int8_dynamic(model)
    for name, module in qmodel.named_modules():
        if not isinstance(module, DynamicQuantLinear):
            continue
        scales = tensors[f"{name}.scales"].double()
        qweight = torch._make_per_channel_quantized_tensor(
            tensors[f"{name}.qweight"], scales, torch.zeros_like(scales, dtype=torch.long), 0
        )
        module.set_weight_bias(qweight, tensors.get(f"{name}.bias"))
    qmodel.eval()
    return qmodel


@torch.no_grad()
def mean_token_kl(
    p_model: nn.Module | PreTrainedModel, q_model: nn.Module | PreTrainedModel, sequences: list[list[int]]
) -> float:
    """Mean over tokens of KL(p || q) between two models' next-token distributions on ``sequences``."""
    total, count = 0.0, 0
    for seq in sequences:
        ids = torch.tensor([seq])
        logp = F.log_softmax(p_model(input_ids=ids).logits.float(), dim=-1)
        logq = F.log_softmax(q_model(input_ids=ids).logits.float(), dim=-1)
        total += (logp.exp() * (logp - logq)).sum(-1).sum().item()
        count += ids.shape[1]
    return total / max(count, 1)
