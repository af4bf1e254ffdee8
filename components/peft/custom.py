"""The PEFT methods PEFT 0.21 does not ship: BitFit, Houlsby bottleneck adapters and TinyTL.

All three add small trainable tensors beside a frozen model and leave its own weights, and
their names, untouched: the new tensors are registered on the Linear layers they modify and
enter through forward hooks. So ``q_proj.weight`` keeps its name, a frozen weight can be
compared bit for bit, and the saved file holds only the new tensors.

- **BitFit** (Ben Zaken et al., 2022) trains bias terms only. Llama-family layers have none
  (``attention_bias``/``mlp_bias`` off), so a zero bias is added to each targeted Linear: the
  model starts exactly equal to the base. It merges: the bias becomes the Linear's own, and
  the config switches ``attention_bias``/``mlp_bias`` on (zero for untargeted layers).
- **Adapters** (Houlsby et al., 2019): ``y + up(act(down(y)))`` on the attention output
  (``o_proj``) and/or the MLP output (``down_proj``), before the residual add. ``up`` starts at
  zero, so the model starts equal to the base. Not mergeable (the nonlinearity), and each
  adapter adds latency: two extra matmuls per placement per layer.
- **TinyTL** (Cai et al., 2020): biases plus *lite residual* branches beside targeted Linears,
  ``W x + b + up(act(down(pool_r(x))))``, where ``pool_r`` averages groups of ``r`` input
  features. The frozen weight's gradient is never needed, and the branch's own backward keeps
  only the pooled input (d/r values per token), the paper's memory argument. ``up`` starts at
  zero. The biases merge; the branches do not.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from components.config import to_dict
from components.errors import PosttrainError

CUSTOM_METHODS = ("bitfit", "adapter", "tinytl")
CUSTOM_CONFIG = "posttrain_peft.json"
CUSTOM_WEIGHTS = "peft_weights.safetensors"
BIAS = "bitfit_bias"  # the attribute name of an added bias on a Linear
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}
# transformers' config flags for the Llama family's Linear biases (attention: q/k/v/o; mlp: gate/up/down)
ATTENTION_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


class PeftSetupError(PosttrainError):
    """A PEFT setting that does not fit the model (the message names the params key)."""


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` (and bitsandbytes subclass) of the model by its full name, heads excluded."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not name.endswith("lm_head")
    }


def match_modules(model: nn.Module, targets: tuple[str, ...] | list[str], key: str) -> dict[str, nn.Linear]:
    """Linear layers whose last name component is in ``targets``; an unknown target names ``key``."""
    linears = linear_modules(model)
    known = sorted({name.rsplit(".", 1)[-1] for name in linears})
    missing = [t for t in targets if t not in known]
    if missing:
        raise PeftSetupError(
            f"{key}: no Linear layer named {missing} in this model (its Linear layers: {', '.join(known)})"
        )
    return {name: m for name, m in linears.items() if name.rsplit(".", 1)[-1] in targets}


class Bottleneck(nn.Module):
    """``up(act(down(x)))``, ``up`` zero at init; ``reduction`` > 1 average-pools the input features first."""

    def __init__(self, d_in: int, d_out: int, width: int, activation: str, reduction: int = 1) -> None:
        super().__init__()
        self.reduction = reduction
        self.down = nn.Linear(math.ceil(d_in / reduction), width)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(width, d_out)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reduction > 1:
            pad = (-x.shape[-1]) % self.reduction
            x = nn.functional.pad(x, (0, pad)) if pad else x
            x = x.unflatten(-1, (-1, self.reduction)).mean(-1)
        return self.up(self.act(self.down(x.to(self.down.weight.dtype))))


def _add_bias(module: nn.Linear) -> None:
    bias = nn.Parameter(torch.zeros(module.out_features, dtype=torch.float32, device=module.weight.device))
    module.register_parameter(BIAS, bias)
    # kept on the module, so merging can take exactly this hook off again
    module.bitfit_hook = module.register_forward_hook(
        lambda m, _inp, out: out + getattr(m, BIAS).to(out.dtype)
    )


def _add_branch(module: nn.Linear, name: str, branch: nn.Module, on_output: bool) -> None:
    """Register ``branch`` on ``module``; a hook adds ``branch(output)`` (or of the input) to the output."""
    module.add_module(name, branch.to(module.weight.device))
    if on_output:
        module.register_forward_hook(lambda m, _inp, out: out + getattr(m, name)(out).to(out.dtype))
    else:
        module.register_forward_hook(lambda m, inp, out: out + getattr(m, name)(inp[0]).to(out.dtype))


def inject(model: PreTrainedModel, method: str, settings: Any, key: str) -> None:
    """Add ``method``'s modules to ``model`` in place (:func:`added_parameters` lists their tensors).

    ``settings`` is the method's sub-block of ``peft`` (``BitFitSettings``, ...); ``key`` its
    dotted params key, for errors. Seeded by the caller (the adapters' down projections are random).
    """
    if method == "bitfit":
        for module in match_modules(model, settings.target_modules, f"{key}.target_modules").values():
            _add_bias(module)
    elif method == "adapter":
        places = {"both": ("o_proj", "down_proj"), "attention": ("o_proj",), "mlp": ("down_proj",)}
        for module in match_modules(model, places[settings.placement], f"{key}.placement").values():
            width = module.out_features
            branch = Bottleneck(width, width, settings.bottleneck, settings.activation)
            _add_branch(module, "bottleneck_adapter", branch, on_output=True)
    elif method == "tinytl":
        for module in match_modules(model, settings.target_modules, f"{key}.target_modules").values():
            _add_bias(module)
            branch = Bottleneck(
                module.in_features, module.out_features, settings.bottleneck, "relu", settings.reduction
            )
            _add_branch(module, "lite_residual", branch, on_output=False)
    else:
        raise ValueError(f"not one of ours: {method!r}")


def added_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The parameters :func:`inject` added (biases, bottleneck and lite-residual weights)."""
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == BIAS or ".bottleneck_adapter." in name or ".lite_residual." in name:
            yield name, param


def save_custom(
    model: nn.Module, out_dir: Path, method: str, settings: Any, base: str | Path, trainable: list[str]
) -> None:
    """Write the trained tensors (added ones and any ``modules_to_save`` weights) and their config."""
    params = dict(model.named_parameters())
    tensors = {name: params[name].detach().to(torch.float32).contiguous().cpu() for name in trainable}
    save_file(tensors, str(out_dir / CUSTOM_WEIGHTS))
    config = {
        "method": method,
        "settings": to_dict(settings),
        "base_model_name_or_path": str(base),
        "tensors": sorted(tensors),
    }
    (out_dir / CUSTOM_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_custom_config(path: Path | str) -> dict[str, Any]:
    return json.loads((Path(path) / CUSTOM_CONFIG).read_text())


def attach_custom(model: PreTrainedModel, path: Path | str) -> PreTrainedModel:
    """``model`` (the base, loaded) with the saved method of ``path`` injected and its tensors loaded."""
    from types import SimpleNamespace

    config = read_custom_config(path)
    settings = SimpleNamespace(**config["settings"])
    torch.manual_seed(0)  # the values are overwritten below; only shapes matter
    inject(model, config["method"], settings, f"{path}: peft.{config['method']}")
    tensors = load_file(str(Path(path) / CUSTOM_WEIGHTS))
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise PeftSetupError(f"{path}: tensors {unknown[:3]} have no place in the base model it names")
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise PeftSetupError(
                    f"{path}: {name} has shape {tuple(value.shape)}, "
                    f"the base model's {tuple(params[name].shape)}"
                )
            params[name].copy_(value.to(params[name].dtype))
    model.eval()
    return model


def merge_biases(model: PreTrainedModel) -> PreTrainedModel:
    """Fold every added BitFit/TinyTL bias into its Linear's own bias; switch the config flags on.

    Llama's ``attention_bias``/``mlp_bias`` give *every* layer of that group a bias, so layers
    without a trained one get zeros: the merged model loads with plain ``from_pretrained``.
    Lite residual branches, if any, are left attached (they cannot merge).
    """
    groups: set[str] = set()
    for name, module in linear_modules(model).items():
        if hasattr(module, BIAS):
            leaf = name.rsplit(".", 1)[-1]
            groups.add("attention" if leaf in ATTENTION_PROJ else "mlp" if leaf in MLP_PROJ else leaf)
    unknown = groups - {"attention", "mlp"}
    if unknown:
        raise PeftSetupError(f"BitFit biases on {sorted(unknown)} cannot merge into a Llama config")
    for name, module in linear_modules(model).items():
        leaf = name.rsplit(".", 1)[-1]
        group = "attention" if leaf in ATTENTION_PROJ else "mlp" if leaf in MLP_PROJ else None
        if group not in groups:
            continue
        value = getattr(module, BIAS).detach().clone() if hasattr(module, BIAS) else None
        if module.bias is None:
            zeros = torch.zeros(module.out_features, dtype=module.weight.dtype, device=module.weight.device)
            module.bias = nn.Parameter(zeros)
        if value is not None:
            with torch.no_grad():
                module.bias += value.to(module.bias.dtype)
            module.bitfit_hook.remove()
            del module._parameters[BIAS]
            del module.bitfit_hook
    if "attention" in groups:
        model.config.attention_bias = True
    if "mlp" in groups:
        model.config.mlp_bias = True
    return model
