"""Pruning of causal LMs: unstructured magnitude, semi-structured N:M, and structured MLP channels.

Which weights are prunable (:func:`prunable_linears`): every ``nn.Linear`` weight except one tied to
the input embeddings (``lm_head`` in SmolLM2), the same selection as quantization's
``_replace_linears``. Embeddings, norms and biases are never pruned: they are a small share of
the parameters, and zeroing rows of an embedding removes tokens rather than redundancy. An
*untied* ``lm_head`` is an ordinary linear and is pruned like the others.

Three methods:

- :func:`magnitude_prune`: unstructured, the ``sparsity`` fraction of smallest ``|w|`` of every
  prunable matrix set to zero.
- :func:`n_m_prune`: semi-structured N:M, in every group of ``m`` consecutive input weights of a
  row the ``n`` largest ``|w|`` kept (2:4 is what sparse tensor cores accelerate).
- :func:`prune_mlp_channels`: structured, the least important intermediate channels of every
  MLP removed and the projections physically sliced, so the model really is smaller and
  ``save_pretrained``/``from_pretrained`` handle it with no custom code.

The first two return boolean masks (``True`` = kept) by parameter name, which
:func:`recovery_finetune` uses to keep the pruned weights at exactly zero while the rest recover.

Saving. An unstructured or N:M pruned model is an ordinary transformers model whose weights happen
to contain zeros: ``save_pretrained`` writes it densely, zeros and all, so *its files do not shrink*
(a dense fp32 matrix costs 4 bytes a weight whatever its sparsity). :func:`save_sparse` writes
``model.sparse.safetensors`` instead: each sparse linear weight as its kept values (fp32) plus a
packed bitmask (one bit a weight, the bit order of :func:`~components.compression.bitdelta.pack_signs`),
every other tensor dense; at 50% sparsity those weights take ``(0.5 * 4 + 1/8) / 4 ≈ 53%`` of
their fp32 size. Nothing runs faster for it: :func:`load_sparse` rebuilds dense weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from components.compression.batches import pad_batch, seeded_batches
from components.compression.bitdelta import pack_signs, tied_aliases, unpack_signs

SPARSE_FILE = "model.sparse.safetensors"
SPARSE_FORMAT = "posttrain-sparse"


# ----------------------------------------------------------------- what is prunable


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """``{module name: nn.Linear}`` for every linear whose weight is not tied to the input embeddings."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    tied = embeddings.weight if embeddings is not None else None
    return {
        name: module
        for name, module in model.named_modules()
        if type(module) is nn.Linear and module.weight is not tied
    }


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero, in place, every weight whose mask entry is ``False`` (masks keyed by parameter name)."""
    params = dict(model.named_parameters())
    unknown = sorted(masks.keys() - params.keys())
    if unknown:
        raise ValueError(f"masks for parameters the model does not have: {unknown[:3]}")
    for name, mask in masks.items():
        param = params[name]
        if mask.shape != param.shape:
            raise ValueError(f"{name}: mask shape {tuple(mask.shape)}, weight {tuple(param.shape)}")
        param.masked_fill_(~mask.to(param.device, torch.bool), 0)


# ----------------------------------------------------------------- unstructured magnitude


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask (``True`` = kept) pruning the ``round(sparsity * numel)`` smallest ``|w|``.

    Ties are broken by position: a stable sort keeps equal magnitudes in flat (row-major) order,
    so among equals the earlier weights are pruned first, the same way on every run and device.
    """
    flat = weight.detach().abs().float().reshape(-1)
    n_pruned = int(sparsity * flat.numel() + 0.5)
    order = torch.argsort(flat, stable=True)
    mask = torch.ones_like(flat, dtype=torch.bool)
    mask[order[:n_pruned]] = False
    return mask.reshape(weight.shape)


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"compress.prune.sparsity: {sparsity} is not in [0, 1)")


@torch.no_grad()
def magnitude_prune(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Zero the ``sparsity`` fraction of smallest ``|w|`` of *each* prunable matrix, in place; the masks.

    Per matrix rather than one global threshold: weight scales differ a lot between matrices
    (``down_proj`` against ``v_proj``, early layers against late ones), so a global threshold
    prunes some matrices almost entirely and others barely at all, and a matrix with nothing left
    cuts its layer out of the network. Uniform per-layer sparsity is what SparseGPT and Wanda use
    for LLMs too. It also makes the target exact: each matrix loses ``round(sparsity * numel)``
    weights, so the total misses ``sparsity`` by at most half a weight per matrix.

    Returns ``{parameter name: bool mask}`` (``True`` = kept, on the weight's device).
    """
    _check_sparsity(sparsity)
    masks = {}
    for name, module in prunable_linears(model).items():
        mask = magnitude_mask(module.weight, sparsity)
        module.weight.masked_fill_(~mask, 0)
        masks[f"{name}.weight"] = mask
    return masks


# ----------------------------------------------------------------- semi-structured N:M


def n_m_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest ``|w|`` in each group of ``m`` consecutive inputs of a row.

    Ties go to the earlier input (stable descending sort), so the mask is deterministic.
    """
    out_features, in_features = weight.shape
    groups = weight.detach().abs().float().reshape(out_features, in_features // m, m)
    order = torch.argsort(groups, dim=-1, descending=True, stable=True)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, order[..., :n], True)
    return mask.reshape(weight.shape)


@torch.no_grad()
def n_m_prune(model: nn.Module, n: int = 2, m: int = 4) -> dict[str, torch.Tensor]:
    """N:M-prune every prunable linear along its input dimension, in place; the masks (``True`` = kept).

    Every matrix is checked before any is touched, so a ``ValueError`` (``m`` not dividing some
    ``in_features``) leaves the model as it was.
    """
    if not 0 <= n <= m or m < 1:
        raise ValueError(f"compress.prune.n_m: {n}:{m} needs 0 <= n <= m and m >= 1")
    linears = prunable_linears(model)
    for name, module in linears.items():
        if module.in_features % m:
            raise ValueError(
                f"compress.prune.n_m: {n}:{m} needs in_features divisible by {m}, "
                f"but {name} has {module.in_features}"
            )
    masks = {}
    for name, module in linears.items():
        mask = n_m_mask(module.weight, n, m)
        module.weight.masked_fill_(~mask, 0)
        masks[f"{name}.weight"] = mask
    return masks


# ----------------------------------------------------------------- structured MLP channels


def gated_mlps(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: mlp}`` for every module with ``gate_proj``, ``up_proj`` and ``down_proj`` linears."""
    return {
        name: module
        for name, module in model.named_modules()
        if all(isinstance(getattr(module, p, None), nn.Linear) for p in ("gate_proj", "up_proj", "down_proj"))
    }


@torch.no_grad()
def mlp_channel_importance(mlp: nn.Module) -> torch.Tensor:
    """One score per intermediate channel ``i``: ``||gate_i|| * ||up_i|| * ||down[:, i]||`` (L2).

    Channel ``i`` adds ``down[:, i] * silu(gate_i · x) * (up_i · x)`` to the output. With
    ``|silu(z)| <= |z|`` and Cauchy-Schwarz that is at most ``||down[:, i]|| * ||gate_i|| *
    ||up_i|| * ||x||²``: the score bounds every channel's contribution by the same ``||x||²``,
    so ranking by it drops the channels that can contribute least. It is data-free (no
    calibration pass); activation-aware scores (Wanda-style, LLM-Pruner) rank better on real
    models with outlier features, at the cost of running calibration data through the model.
    """
    gate = mlp.gate_proj.weight.detach().float().norm(dim=1)
    up = mlp.up_proj.weight.detach().float().norm(dim=1)
    down = mlp.down_proj.weight.detach().float().norm(dim=0)
    return gate * up * down


def channels_to_keep(scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Indices (ascending) of the ``ceil(keep_ratio * len(scores))`` highest scores.

    Ties go to the lower index (stable descending sort).
    """
    n_keep = max(1, math.ceil(keep_ratio * scores.numel()))
    order = torch.argsort(scores, descending=True, stable=True)
    return order[:n_keep].sort().values


def mlp_channels_to_keep(model: nn.Module, keep_ratio: float) -> dict[str, torch.Tensor]:
    """``{mlp name: kept channel indices}``: what :func:`prune_mlp_channels` keeps, without slicing."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"compress.prune.keep_ratio: {keep_ratio} is not in (0, 1]")
    mlps = gated_mlps(model)
    if not mlps:
        raise ValueError("prune_mlp_channels: the model has no gate_proj/up_proj/down_proj MLPs")
    return {name: channels_to_keep(mlp_channel_importance(mlp), keep_ratio) for name, mlp in mlps.items()}


def _sliced_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new ``nn.Linear`` with only the output rows (``dim=0``) or input columns (``dim=1``) in ``index``."""
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device))
    out_features, in_features = weight.shape
    has_bias = linear.bias is not None
    sliced = nn.Linear(in_features, out_features, bias=has_bias, device="meta")
    sliced.weight = nn.Parameter(weight.clone(), requires_grad=linear.weight.requires_grad)
    if has_bias:
        # Bias is per output: sliced with the rows, whole when the inputs are sliced.
        bias = linear.bias.detach()
        bias = bias.index_select(0, index.to(bias.device)) if dim == 0 else bias
        sliced.bias = nn.Parameter(bias.clone(), requires_grad=linear.bias.requires_grad)
    return sliced


@torch.no_grad()
def prune_mlp_channels(model: PreTrainedModel, keep_ratio: float) -> PreTrainedModel:
    """Remove the least important MLP channels of every decoder layer, in place; returns ``model``.

    Per layer, the ``ceil(keep_ratio * intermediate_size)`` channels with the highest
    :func:`mlp_channel_importance` are kept and ``gate_proj``/``up_proj`` (rows) and ``down_proj``
    (columns) are replaced by smaller ``nn.Linear`` modules, so the output is exactly that of the
    unsliced model with the dropped channels zeroed. When every layer keeps the same count (it
    does for one ratio and one ``intermediate_size``) ``config.intermediate_size`` is updated, so
    ``save_pretrained`` + ``AutoModelForCausalLM.from_pretrained`` reload the smaller model.

    Attention heads are not pruned. With grouped-query attention the query heads come in groups
    sharing one key/value head, and transformers' config has one ``num_attention_heads``,
    ``num_key_value_heads`` and ``head_dim`` for all layers: a head can only go if every layer drops
    the same number from every group (or whole groups with their k/v heads), which is a
    different and much coarser ranking problem than channels.
    """
    keep = mlp_channels_to_keep(model, keep_ratio)
    for name, index in keep.items():
        mlp = model.get_submodule(name)
        mlp.gate_proj = _sliced_linear(mlp.gate_proj, index, dim=0)
        mlp.up_proj = _sliced_linear(mlp.up_proj, index, dim=0)
        mlp.down_proj = _sliced_linear(mlp.down_proj, index, dim=1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = index.numel()
    counts = {index.numel() for index in keep.values()}
    config = getattr(model, "config", None)
    if len(counts) == 1 and config is not None and hasattr(config, "intermediate_size"):
        config.intermediate_size = counts.pop()
    return model


# ----------------------------------------------------------------- recovery fine-tune


def causal_lm_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every real token after a sequence's first (padding ignored)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def recovery_finetune(
    model: nn.Module,
    masks: dict[str, torch.Tensor],
    sequences: list[list[int]],
    steps: int,
    learning_rate: float,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = False,
) -> list[dict[str, float]]:
    """Fine-tune ``model`` (causal LM loss, AdamW) on ``sequences`` while pruned weights stay exactly zero.

    Before each optimizer step the gradients of pruned weights are zeroed, so Adam's moments for
    them stay zero; after it the masks are re-applied, which also catches anything else that
    could move them. ``masks`` may be empty (a structurally pruned model has nothing to hold at
    zero). Every parameter that requires grad trains, with no weight decay (a few hundred steps
    of recovery shouldn't pull the surviving weights towards zero). Batches come from a seeded
    shuffle, epoch after epoch, right-padded with an attention mask, on the model's device.
    Returns ``[{"step", "loss"}]``.
    """
    if not sequences:
        raise ValueError("recovery_finetune: no training sequences")
    if any(len(s) < 2 for s in sequences):
        raise ValueError("recovery_finetune: every sequence needs at least 2 tokens (one to predict)")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("recovery_finetune: the model has no trainable parameters")
    device = params[0].device
    named = dict(model.named_parameters())
    unknown = sorted(masks.keys() - named.keys())
    if unknown:
        raise ValueError(f"recovery_finetune: masks for parameters the model does not have: {unknown[:3]}")
    masks = {name: mask.to(named[name].device, torch.bool) for name, mask in masks.items()}
    apply_masks(model, masks)
    was_training = model.training
    model.train()
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    batches = seeded_batches(len(sequences), batch_size, seed)
    history: list[dict[str, float]] = []
    for step in tqdm(range(steps), desc="prune recovery", disable=not progress):
        ids, mask = (t.to(device) for t in pad_batch([sequences[i] for i in next(batches)]))
        loss = causal_lm_loss(model, ids, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for name, keep in masks.items():
            grad = named[name].grad
            if grad is not None:
                grad.masked_fill_(~keep, 0)
        optimizer.step()
        apply_masks(model, masks)
        history.append({"step": step, "loss": loss.item()})
    model.train(was_training)
    return history


# ----------------------------------------------------------------- report


@torch.no_grad()
def sparsity_report(model: nn.Module) -> dict[str, float | int]:
    """Zeros among the prunable linear weights, and parameter counts (a tied tensor counts once).

    ``{"sparsity": zero_params / prunable_params, "zero_params", "prunable_params", "total_params"}``.
    """
    weights = [module.weight for module in prunable_linears(model).values()]
    prunable = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return {
        "sparsity": zeros / prunable if prunable else 0.0,
        "zero_params": zeros,
        "prunable_params": prunable,
        "total_params": sum(p.numel() for p in model.parameters()),
    }


# ----------------------------------------------------------------- sparse save / load


def _sparse_pays(weight: torch.Tensor, kept: int) -> bool:
    """Whether fp32 kept values plus a one-bit-a-weight mask take fewer bytes than the dense tensor."""
    return kept * 4 + math.ceil(weight.numel() / 8) < weight.numel() * weight.element_size()


@torch.no_grad()
def save_sparse(model: PreTrainedModel, out_dir: Path | str) -> Path:
    """Write ``model`` to ``out_dir/model.sparse.safetensors`` (and its ``config.json``); the path.

    Each prunable linear weight for which it saves bytes is stored as ``<name>.values`` (its
    nonzero values in row-major order, fp32) and ``<name>.mask`` (``weight != 0`` packed 8 a byte,
    bit ``i % 8`` of byte ``i // 8`` = flat element ``i``, as :func:`pack_signs` packs); every other
    tensor is stored dense in its own dtype, a tied one once. Metadata: the format tag and the
    sparse weights' shapes.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    aliases = tied_aliases(model)
    sparse_names = {f"{name}.weight" for name in prunable_linears(model)}
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name, tensor in model.state_dict().items():
        if name in aliases:
            continue
        tensor = tensor.detach().cpu()
        keep = tensor != 0
        kept = int(keep.sum())
        if name in sparse_names and _sparse_pays(tensor, kept):
            shapes[name] = list(tensor.shape)
            tensors[f"{name}.values"] = tensor[keep].float().contiguous()
            tensors[f"{name}.mask"] = pack_signs(keep.float()).contiguous()
        else:
            tensors[name] = tensor.contiguous()
    path = out_dir / SPARSE_FILE
    save_file(tensors, str(path), metadata={"format": SPARSE_FORMAT, "shapes": json.dumps(shapes)})
    if isinstance(model, PreTrainedModel):
        model.config.save_pretrained(str(out_dir))
    return path


def _read_sparse(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a sparse file, after checking its format tag."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no sparse weights")
    with safe_open(str(path), "pt") as fh:
        metadata = fh.metadata() or {}
        if metadata.get("format") != SPARSE_FORMAT:
            raise ValueError(f"{path}: format {metadata.get('format')!r}, expected {SPARSE_FORMAT!r}")
        return metadata, {key: fh.get_tensor(key) for key in fh.keys()}


def _densify(
    path: Path, name: str, shape: list[int], values: torch.Tensor, packed: torch.Tensor
) -> torch.Tensor:
    """The dense weight a ``(values, mask)`` pair stands for."""
    keep = unpack_signs(packed, shape) > 0
    if int(keep.sum()) != values.numel():
        raise ValueError(f"{path}: {name} has {values.numel()} values for {int(keep.sum())} kept weights")
    weight = torch.zeros(shape, dtype=values.dtype)
    weight[keep] = values
    return weight


@torch.no_grad()
def load_sparse(model_dir: Path | str) -> PreTrainedModel:
    """Rebuild the model saved by :func:`save_sparse` (architecture from ``config.json`` beside it)."""
    model_dir = Path(model_dir)
    path = model_dir / SPARSE_FILE
    metadata, tensors = _read_sparse(path)
    state = {}
    for name, shape in json.loads(metadata.get("shapes", "{}")).items():
        values, packed = tensors.pop(f"{name}.values"), tensors.pop(f"{name}.mask")
        state[name] = _densify(path, name, shape, values, packed)
    state.update(tensors)
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    # Built on the CPU, not the meta device: non-persistent buffers (rotary inv_freq) are not in
    # the file, and to_empty() would leave them uninitialised.
    model = AutoModelForCausalLM.from_config(config)
    result = model.load_state_dict(state, strict=False)
    missing = sorted(set(result.missing_keys) - tied_aliases(model).keys())
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: missing tensors {missing[:3]}, unexpected {sorted(result.unexpected_keys)[:3]}"
        )
    return model.eval()
