"""The PEFT menu, for any training stage: build the trainable model, save it, measure it.

``peft.method`` picks one of:

| method  | what trains                                     | from        | merges |
|---------|-------------------------------------------------|-------------|--------|
| full    | every weight                                    | -           | -      |
| lora    | ``xAB`` beside targeted Linears (B = 0 at init) | PEFT        | yes    |
| dora    | LoRA's direction + a per-column magnitude       | PEFT        | yes    |
| qlora   | LoRA over a 4-bit NF4, double-quantized base    | PEFT + bnb  | yes, onto the fp32 base |
| ia3     | per-channel scales of keys, values, MLP input   | PEFT        | yes    |
| prefix  | per-layer key/value prefixes                    | PEFT        | no     |
| prompt  | k virtual input-token embeddings                | PEFT        | no     |
| bitfit  | (added, zero) biases only                       | ours        | yes    |
| adapter | Houlsby bottlenecks after attention / MLP       | ours        | no     |
| tinytl  | biases + lite residual branches                 | ours        | no     |

PEFT's methods are handed to TRL's trainers as a ``peft_config``; ours (``components.peft.custom``)
are injected into the model, which the trainer then trains as it is (only their tensors, and
``modules_to_save``, require grad).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit
from peft import PeftConfig as LibraryPeftConfig
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel

from components.params import LORA_FAMILY, PeftConfig
from components.peft.custom import (
    CUSTOM_METHODS,
    PeftSetupError,
    added_parameters,
    inject,
    match_modules,
)


@dataclass
class TrainablePolicy:
    """A model ready for a TRL trainer: pass ``model`` and ``peft_config`` (None for full / ours)."""

    model: PreTrainedModel
    peft_config: LibraryPeftConfig | None
    method: str
    key: str  # the params key of the peft block, for messages (``sft.peft``)
    facts: dict[str, float] = field(default_factory=dict)  # measured at load (QLoRA's byte ratio)
    adapter_dtype: torch.dtype | None = None  # QLoRA: the dtype trained tensors must keep (compute dtype)
    device: str = "cpu"  # where it trains (resolved from params.compute)

    def optimizer_args(self) -> dict[str, Any]:
        """Trainer arguments for the optimizer: QLoRA's paged AdamW (optimizer state paged to CPU
        under memory pressure) where CUDA is; elsewhere the default AdamW (paging needs CUDA)."""
        if self.method == "qlora" and torch.device(self.device).type == "cuda":
            return {"optim": "paged_adamw_32bit"}
        return {}

    def settle(self, trainer: Any) -> None:
        """Call after building a TRL trainer: undo its QLoRA cast where it does not fit the device.

        TRL 1.16 casts every trainable tensor of a 4-bit model to bf16 (the QLoRA paper's 16-bit
        adapters). On CPU the 4-bit layers compute in fp32, and a bf16 ``modules_to_save`` head
        then fails in TRL's fused LM-head loss (dtype mismatch): there they go back to fp32.
        """
        if self.adapter_dtype is None:
            return
        for param in trainer.model.parameters():
            if param.requires_grad and param.dtype != self.adapter_dtype and param.is_floating_point():
                param.data = param.data.to(self.adapter_dtype)


def _check_names(model: torch.nn.Module, cfg: PeftConfig, key: str) -> None:
    """Unknown target modules / modules_to_save fail here, naming the key (PEFT's error is a traceback)."""
    if cfg.method in LORA_FAMILY:
        match_modules(model, cfg.lora.target_modules, f"{key}.lora.target_modules")
    elif cfg.method == "ia3":
        match_modules(model, cfg.ia3.target_modules, f"{key}.ia3.target_modules")
    if cfg.method != "full":
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [m for m in cfg.modules_to_save if m not in names]
        if missing:
            raise PeftSetupError(f"{key}.modules_to_save: no module named {missing} in this model")


def library_config(
    cfg: PeftConfig,
    model: PreTrainedModel,
    key: str,
    *,
    task_type: str = "CAUSAL_LM",
    new_tokens: Sequence[int] = (),
    tokenizer_path: str | Path = "",
) -> LibraryPeftConfig | None:
    """PEFT's config for ``cfg.method`` (None for full and for our own methods).

    ``new_tokens``: input-embedding rows the base stage added (role tokens), which no adapter
    would train. Unless ``modules_to_save`` already trains the embedding, LoRA-family methods
    train exactly those rows (PEFT's ``trainable_token_indices``) when the embeddings are untied;
    with tied embeddings, or for the other methods, the whole input embedding trains (kept tied:
    TRL 1.16's SFT loss reads the output layer's plain ``weight``, which a trainable-tokens
    wrapper does not carry).
    """
    if cfg.method == "full" or cfg.method in CUSTOM_METHODS:
        return None
    _check_names(model, cfg, key)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    modules = list(cfg.modules_to_save)
    rows = None
    if new_tokens and "embed_tokens" not in modules:
        if tied or cfg.method not in LORA_FAMILY:
            modules.append("embed_tokens")
        else:
            rows = {"embed_tokens": list(new_tokens)}
    if task_type == "SEQ_CLS":  # the head is new: always trained (PEFT would add it itself)
        modules = [m for m in modules if m != "lm_head"] + ["score"]
    common: dict[str, Any] = {"task_type": task_type, "modules_to_save": modules or None}
    if cfg.method in LORA_FAMILY:
        lora = cfg.lora
        return LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            use_rslora=lora.rslora,
            use_dora=cfg.method == "dora",
            target_modules=list(lora.target_modules),
            trainable_token_indices=rows,
            ensure_weight_tying=tied and "embed_tokens" in modules,
            **common,
        )
    if cfg.method == "ia3":
        return IA3Config(
            target_modules=list(cfg.ia3.target_modules),
            feedforward_modules=list(cfg.ia3.feedforward_modules),
            **common,
        )
    if cfg.method == "prompt":
        init = {
            "sample_vocab": PromptTuningInit.SAMPLE_VOCAB,
            "random": PromptTuningInit.RANDOM,
            "text": PromptTuningInit.TEXT,
        }[cfg.prompt.init]
        text = cfg.prompt.init == "text"
        return PromptTuningConfig(
            num_virtual_tokens=cfg.prompt.num_virtual_tokens,
            prompt_tuning_init=init,
            prompt_tuning_init_text=cfg.prompt.init_text if text else None,
            tokenizer_name_or_path=str(tokenizer_path) if text else None,
            **common,
        )
    if cfg.method == "prefix":
        return PrefixTuningConfig(
            num_virtual_tokens=cfg.prefix.num_virtual_tokens,
            prefix_projection=cfg.prefix.projection_size > 0,
            encoder_hidden_size=cfg.prefix.projection_size or model.config.hidden_size,
            **common,
        )
    raise PeftSetupError(f"{key}.method: unknown method {cfg.method!r}")


def qlora_quantization(cfg: PeftConfig, device: str, key: str = "peft") -> Any:
    """bitsandbytes' 4-bit config for QLoRA (fp32 compute on CPU, bf16 on CUDA); one line if it cannot."""
    from components.compression.bnb import SKIP_MODULES, BnbUnavailableError, bnb_config, require_bnb

    try:
        require_bnb("nf4", device, setting=f"{key}.method: qlora: nf4")
    except BnbUnavailableError as exc:
        raise PeftSetupError(str(exc)) from exc
    return bnb_config(
        "nf4",
        device,
        quant_type=cfg.qlora.quant_type,
        double_quant=cfg.qlora.double_quant,
        skip_modules=(*SKIP_MODULES, "score"),
    )


def load_quantized(
    plain_dir: Path | str, cfg: PeftConfig, device: str, reward_head: bool, key: str = "peft"
) -> PreTrainedModel:
    """The 4-bit base for QLoRA, read from a directory of full-precision weights."""
    from components.compression.bnb import disable_cpu_repack

    loader = AutoModelForSequenceClassification if reward_head else AutoModelForCausalLM
    extra = {"num_labels": 1} if reward_head else {}
    model = loader.from_pretrained(
        str(plain_dir),
        quantization_config=qlora_quantization(cfg, device, key),
        dtype=torch.float32,
        device_map={"": device},
        trust_remote_code=False,
        **extra,
    )
    # The CPU repack would silently stop LoRA's gradients after the first eval (see compression/bnb.py).
    disable_cpu_repack(model)
    return model


def prepare(
    model: PreTrainedModel,
    cfg: PeftConfig,
    key: str,
    *,
    task_type: str = "CAUSAL_LM",
    new_tokens: Sequence[int] = (),
    tokenizer_path: str | Path = "",
    seed: int = 0,
) -> TrainablePolicy:
    """``model`` set up to train by ``cfg.method``: PEFT's config for the trainer, or ours injected."""
    if cfg.method == "full":  # a merged adapter chain comes back frozen (PEFT's inference mode)
        for param in model.parameters():
            param.requires_grad_(True)
        return TrainablePolicy(model, None, cfg.method, key)
    if cfg.method not in CUSTOM_METHODS:
        peft_config = library_config(
            cfg, model, key, task_type=task_type, new_tokens=new_tokens, tokenizer_path=tokenizer_path
        )
        return TrainablePolicy(model, peft_config, cfg.method, key)
    _check_names(model, cfg, key)
    for param in model.parameters():
        param.requires_grad_(False)
    torch.manual_seed(seed)
    inject(model, cfg.method, getattr(cfg, cfg.method), f"{key}.{cfg.method}")
    for _, param in added_parameters(model):
        param.requires_grad_(True)
    wanted = set(cfg.modules_to_save) | ({"embed_tokens"} if new_tokens else set())
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in wanted:
            for param in module.parameters(recurse=False):
                param.requires_grad_(True)
    return TrainablePolicy(model, None, cfg.method, key)


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def param_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of the model as it trains: a 4-bit weight counts by its logical
    size (not its packed bytes), and a ``modules_to_save`` module once (its trained copy)."""
    trainable = total = 0
    for name, param in model.named_parameters():
        if ".original_module." in name:  # PEFT keeps the frozen original beside a modules_to_save copy
            continue
        shape = getattr(getattr(param, "quant_state", None), "shape", None)
        n = int(torch.Size(shape).numel()) if shape is not None else param.numel()
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total
