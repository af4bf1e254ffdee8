"""Post-training compression: merge in full precision, then quantize, and measure what it cost.

``dynamic_int8`` is PyTorch's dynamic quantization of every ``nn.Linear`` (int8 weights with
per-output-channel scales, activations quantized on the fly): it runs on any CPU with no
calibration data. The quantized weights are stored in safetensors as int8 tensors plus float
scales (``*.qweight``/``*.scales``) next to the unquantized tensors, so no pickle is involved;
:func:`load_int8` rebuilds the runnable model from that file and the model config.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantLinear
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

INT8_FILE = "model.int8.safetensors"


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
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
    save_file(tensors, str(path), metadata={"format": "posttrain-dynamic-int8"})
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
    qmodel = quantize_dynamic_int8(model)
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


def dir_size(path: Path | str, pattern: str = "*.safetensors") -> int:
    """Bytes of the weight files in a model directory."""
    return sum(p.stat().st_size for p in Path(path).glob(pattern))


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


def load_compressed(model_dir: Path | str) -> nn.Module:
    """The runnable compressed model in ``model_dir``: int8 when present, else the merged weights."""
    from components.models.loading import load_causal_lm

    model_dir = Path(model_dir)
    return load_int8(model_dir) if (model_dir / INT8_FILE).is_file() else load_causal_lm(model_dir / "merged")
