"""Bit-Delta: store a fine-tune as one sign bit per weight plus one scale per matrix.

After Liu et al. 2024, "BitDelta: Your Fine-Tune May Only Be Worth One Bit". A fine-tune moves
each weight matrix only a little from its base, ``Δ = W_fine - W_base``, and that small move
survives being reduced to ``α · sign(Δ)``: one bit per weight and one fp32 ``α`` per matrix,
about 1/16 of the delta's fp16 size. ``α`` starts at ``mean|Δ|``, the closed-form minimiser of
``||Δ - α·sign(Δ)||²``; *scale distillation* (:func:`distill_scales`) then trains only the
``α``'s so the compressed model's next-token distributions match the fine-tuned teacher's,
which repairs most of what the weight-space fit misses, at the cost of a few hundred steps.

What gets a delta (:func:`bitdelta_targets`): every 2-D weight of an ``nn.Linear`` or
``nn.Embedding`` that differs from the base. Other tensors that differ (norm weights, biases:
small and 1-D, where one bit per value would be a poor fit for little saving) are stored densely
in fp32. Tensors equal to the base cost nothing: the file only makes sense next to its base,
whose weights' sha256 it records (:func:`base_weights_hash`) so it can't be applied to another.

A weight tied to another one (``lm_head.weight`` is ``embed_tokens.weight`` in SmolLM2) gets
one delta, and the tied LM head computes its logits from the embedding's effective weight, so
the pair stays tied through distillation and save/load (:class:`TiedBitDeltaHead`).

Sign packing: bit ``i % 8`` of byte ``i // 8`` holds element ``i`` of the flattened delta
(little-endian bit order, the last byte zero-padded); the bit is 1 where ``Δ > 0``. A zero
delta counts as negative (sign -1): every weight needs one of the two signs, and as ``α·(-1)``
it is off by ``α`` either way.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from components.compression.batches import pad_batch, seeded_batches
from components.compression.quantize import mean_token_kl

BITDELTA_FILE = "bitdelta.safetensors"
FORMAT = "posttrain-bitdelta"
OBJECTIVES = ("kl", "mse")
# The dense (fp32) tensors of a Bit-Delta model, kept on the model so save_bitdelta can find them.
_DENSE_ATTR = "_bitdelta_dense"
_BIT_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)


# ----------------------------------------------------------------- sign bits


def pack_signs(delta: torch.Tensor) -> torch.Tensor:
    """Pack ``delta > 0`` into a 1-D uint8 tensor of ``ceil(numel / 8)`` bytes, 8 signs a byte.

    Bit ``i % 8`` (little-endian) of byte ``i // 8`` is element ``i`` of ``delta.flatten()``;
    a zero delta packs as 0, i.e. sign -1 (see the module docstring).
    """
    bits = (delta.detach().reshape(-1) > 0).to(torch.uint8)
    pad = (-bits.numel()) % 8
    bits = torch.cat([bits, bits.new_zeros(pad)]).reshape(-1, 8)
    return (bits * _BIT_WEIGHTS.to(bits.device)).sum(dim=1, dtype=torch.uint8)


def unpack_signs(
    packed: torch.Tensor, shape: Sequence[int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The ±1 tensor of ``shape`` that :func:`pack_signs` packed (1 bits -> +1, 0 bits -> -1)."""
    numel = math.prod(shape)
    if packed.numel() != math.ceil(numel / 8):
        raise ValueError(f"{packed.numel()} packed bytes can't hold {numel} signs (shape {tuple(shape)})")
    bits = (packed.reshape(-1, 1) & _BIT_WEIGHTS.to(packed.device)) != 0
    signs = bits.reshape(-1)[:numel].to(dtype) * 2 - 1
    return signs.reshape(tuple(shape))


# ----------------------------------------------------------------- modules


class _BitDeltaWeight(nn.Module):
    """``base_weight + alpha * S`` with ``S`` = unpacked signs; what the linear and embedding share.

    ``S`` is cached unpacked (fp32, non-persistent) so forward does no bit twiddling; that costs
    as much memory again as ``base_weight``, which is fine for the small models this pipeline
    distills and can be traded back by unpacking in forward.
    """

    def __init__(
        self,
        base_weight: torch.Tensor,
        signs: torch.Tensor,
        alpha: torch.Tensor | float,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        # The dtype the weight had in the base model, for materialize().
        self.weight_dtype = base_weight.dtype
        self.shape = tuple(base_weight.shape)
        # Everything on the base weight's device: a loaded file's tensors arrive on the CPU.
        device = base_weight.device
        self.register_buffer("base_weight", base_weight.detach().float().clone())
        self.register_buffer("signs", signs.detach().to(device, torch.uint8).clone())
        self.register_buffer("sign_matrix", unpack_signs(self.signs, self.shape), persistent=False)
        alpha = torch.as_tensor(alpha, dtype=torch.float32).detach().to(device).clone().reshape(1)
        self.alpha = nn.Parameter(alpha)
        if bias is not None:
            bias = bias.detach().to(device, torch.float32).clone()
        self.register_buffer("bias", bias)

    @staticmethod
    def delta_parts(
        base_weight: torch.Tensor, fine_weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed signs, ``alpha = mean|Δ|``) for ``Δ = fine - base``, computed in fp32."""
        delta = fine_weight.detach().float() - base_weight.detach().float()
        return pack_signs(delta), delta.abs().mean()

    def effective_weight(self) -> torch.Tensor:
        """``base_weight + alpha * S`` (differentiable in ``alpha``)."""
        return self.base_weight + self.alpha * self.sign_matrix

    def extra_repr(self) -> str:
        return f"shape={self.shape}, bias={self.bias is not None}"


class BitDeltaLinear(_BitDeltaWeight):
    """``nn.Linear`` whose weight is a frozen base plus ``alpha * sign(Δ)``; only ``alpha`` trains."""

    @classmethod
    def from_fine(
        cls, base: nn.Linear, fine_weight: torch.Tensor, fine_bias: torch.Tensor | None = None
    ) -> BitDeltaLinear:
        """The layer that approximates ``fine_weight`` from ``base``; the bias is the fine model's."""
        signs, alpha = cls.delta_parts(base.weight, fine_weight)
        return cls(base.weight, signs, alpha, fine_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two matmuls instead of one with effective_weight(): the sign matmul is the one a
        # binary kernel would replace, and alpha's gradient is a dot product with its output.
        base = F.linear(x, self.base_weight.to(x.dtype))
        out = base + self.alpha * F.linear(x, self.sign_matrix.to(x.dtype))
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype)


class BitDeltaEmbedding(_BitDeltaWeight):
    """``nn.Embedding`` with a Bit-Delta weight; outputs in the base weight's dtype.

    ``padding_idx`` is kept only for :func:`materialize` (it changes no forward value, and only
    ``alpha`` trains); ``max_norm`` renormalisation, which transformers' models don't use, is not
    supported.
    """

    def __init__(
        self,
        base_weight: torch.Tensor,
        signs: torch.Tensor,
        alpha: torch.Tensor | float,
        padding_idx: int | None = None,
    ) -> None:
        super().__init__(base_weight, signs, alpha)
        self.padding_idx = padding_idx

    @classmethod
    def from_fine(cls, base: nn.Embedding, fine_weight: torch.Tensor) -> BitDeltaEmbedding:
        """The embedding that approximates ``fine_weight`` from ``base``."""
        if base.max_norm is not None:
            raise ValueError("Bit-Delta does not support nn.Embedding with max_norm")
        signs, alpha = cls.delta_parts(base.weight, fine_weight)
        return cls(base.weight, signs, alpha, base.padding_idx)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = F.embedding(ids, self.base_weight) + self.alpha * F.embedding(ids, self.sign_matrix)
        return out.to(self.weight_dtype)


class TiedBitDeltaHead(nn.Module):
    """An LM head tied to a Bit-Delta weight: ``F.linear(x, owner.effective_weight())``.

    The owner is held outside ``_modules`` so its tensors (and its ``alpha``) appear once in
    ``state_dict()``/``parameters()``, under the owner's name; ``deepcopy`` still maps it to the
    copied owner.
    """

    def __init__(self, owner: _BitDeltaWeight, owner_name: str) -> None:
        super().__init__()
        object.__setattr__(self, "owner", owner)
        self.owner_name = owner_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.owner.effective_weight().to(x.dtype))

    def extra_repr(self) -> str:
        return f"tied_to={self.owner_name}"


# ----------------------------------------------------------------- what gets a delta


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """``{alias: owner}`` for parameters that are the same object under two names.

    The owner is the name ``named_parameters()`` yields (the first registered, e.g. the
    embedding), the alias any later name of the same tensor (e.g. ``lm_head.weight``).
    """
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owner = first.setdefault(id(param), name)
        if owner != name:
            aliases[name] = owner
    return aliases


def bitdelta_targets(base: nn.Module, fine: nn.Module) -> dict[str, str]:
    """What each tensor of ``fine`` that differs from ``base`` becomes, by state_dict name.

    ``"linear"``/``"embedding"``: the 2-D weight of that module type, stored as signs + alpha.
    ``"tied"``: a second name of a delta'd weight (tied in ``fine``), which reuses its owner's.
    ``"dense"``: anything else that differs (norm weights, 1-D tensors), stored in fp32.
    The bias of a delta'd linear is not listed: :class:`BitDeltaLinear` carries the fine bias.
    Raises ``ValueError`` if the two models' tensor names or shapes don't match.
    """
    base_state, fine_state = base.state_dict(), fine.state_dict()
    if base_state.keys() != fine_state.keys():
        odd = sorted(base_state.keys() ^ fine_state.keys())
        raise ValueError(f"base and fine-tuned models have different tensors: {odd[:3]}")
    modules = dict(fine.named_modules())
    aliases = tied_aliases(fine)
    targets: dict[str, str] = {}
    for name, fine_tensor in fine_state.items():
        base_tensor = base_state[name]
        if base_tensor.shape != fine_tensor.shape:
            raise ValueError(
                f"{name}: shape {tuple(fine_tensor.shape)} in the fine-tuned model, "
                f"{tuple(base_tensor.shape)} in the base"
            )
        owner = aliases.get(name)
        if owner is not None and targets.get(owner) in ("linear", "embedding"):
            targets[name] = "tied"
            continue
        if torch.equal(base_tensor, fine_tensor.to(base_tensor.dtype)):
            continue
        module_name, _, attr = name.rpartition(".")
        module = modules.get(module_name)
        if attr == "weight" and fine_tensor.dim() == 2 and type(module) in (nn.Linear, nn.Embedding):
            targets[name] = "linear" if type(module) is nn.Linear else "embedding"
        else:
            targets[name] = "dense"
    for name in [n for n, kind in targets.items() if kind == "linear"]:
        targets.pop(name.removesuffix("weight") + "bias", None)
    return targets


def _module_name(tensor_name: str) -> str:
    return tensor_name.removesuffix(".weight")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def _freeze_all_but_alphas(model: nn.Module) -> None:
    alphas = {id(p) for p in scale_parameters(model)}
    for param in model.parameters():
        param.requires_grad_(id(param) in alphas)


@torch.no_grad()
def _copy_dense(model: nn.Module, dense: dict[str, torch.Tensor]) -> None:
    state = model.state_dict(keep_vars=True)
    for name, value in dense.items():
        state[name].copy_(value.to(state[name].dtype))
    setattr(model, _DENSE_ATTR, tuple(dense))


def build_bitdelta_model(base: PreTrainedModel, fine: PreTrainedModel) -> PreTrainedModel:
    """A copy of ``base`` that approximates ``fine``: delta'd modules swapped for Bit-Delta ones,
    dense entries copied from ``fine``, every parameter but the alphas frozen.

    ``base`` and ``fine`` are left untouched. Alphas start at ``mean|Δ|``; see :func:`distill_scales`.
    """
    targets = bitdelta_targets(base, fine)
    model = copy.deepcopy(base)
    fine_modules = dict(fine.named_modules())
    for name, kind in targets.items():
        module_name = _module_name(name)
        base_module = model.get_submodule(module_name)
        fine_module = fine_modules[module_name]
        if kind == "linear":
            replacement = BitDeltaLinear.from_fine(base_module, fine_module.weight, fine_module.bias)
        elif kind == "embedding":
            replacement = BitDeltaEmbedding.from_fine(base_module, fine_module.weight)
        else:
            continue
        _set_module(model, module_name, replacement)
    _tie_heads(model, {n: o for n, o in tied_aliases(fine).items() if targets.get(n) == "tied"})
    fine_state = fine.state_dict()
    _copy_dense(model, {n: fine_state[n].detach().float() for n, k in targets.items() if k == "dense"})
    _freeze_all_but_alphas(model)
    return model


def _tie_heads(model: nn.Module, aliases: dict[str, str]) -> None:
    """Replace each tied alias's module by a head reading its (already swapped) owner's weight."""
    for alias, owner in aliases.items():
        owner_name = _module_name(owner)
        _set_module(model, _module_name(alias), TiedBitDeltaHead(model.get_submodule(owner_name), owner_name))


def _bitdelta_modules(model: nn.Module) -> dict[str, _BitDeltaWeight]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _BitDeltaWeight)}


def scale_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable scales, one per delta'd matrix (a tied pair shares one)."""
    return [module.alpha for module in _bitdelta_modules(model).values()]


# ----------------------------------------------------------------- scale distillation


def _distill_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, objective: str
) -> torch.Tensor:
    """Mean over real (unpadded) tokens of KL(teacher || student), or of the logits' squared error."""
    real = mask.bool()
    student, teacher = student_logits.float()[real], teacher_logits.float()[real]
    if objective == "kl":
        return F.kl_div(
            F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean"
        )
    return F.mse_loss(student, teacher)


def distill_scales(
    student: nn.Module,
    teacher: nn.Module,
    sequences: list[list[int]],
    objective: str = "kl",
    steps: int = 100,
    learning_rate: float = 1e-4,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = False,
) -> list[dict[str, float]]:
    """Train ``student``'s scales (AdamW, nothing else) to match ``teacher`` on ``sequences``.

    ``objective``: ``"kl"``, KL(P_teacher || P_student) of the next-token distributions (the
    BitDelta paper's); ``"mse"``, squared error of the logits (its reference code's). Batches are
    drawn from a seeded shuffle, epoch after epoch, and run on the scales' device (the teacher
    must be there too); both models run without dropout. Weight decay is 0: it would pull the
    scales towards the base model. Returns ``[{"step", "loss"}]``.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"compress.bitdelta.objective: {objective!r} is not one of {', '.join(OBJECTIVES)}")
    if not sequences:
        raise ValueError("distill_scales: no calibration sequences")
    scales = scale_parameters(student)
    if not scales:
        raise ValueError("distill_scales: the student has no Bit-Delta scales to train")
    scale_ids = {id(p) for p in scales}
    extra = [n for n, p in student.named_parameters() if p.requires_grad and id(p) not in scale_ids]
    if extra:
        raise ValueError(f"distill_scales: only the scales may train, but {extra[:3]} require grad")
    was_training = student.training
    student.eval()
    teacher.eval()
    device = scales[0].device
    optimizer = torch.optim.AdamW(scales, lr=learning_rate, weight_decay=0.0)
    batches = seeded_batches(len(sequences), batch_size, seed)
    history: list[dict[str, float]] = []
    for step in tqdm(range(steps), desc="bitdelta scales", disable=not progress):
        ids, mask = (t.to(device) for t in pad_batch([sequences[i] for i in next(batches)]))
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits
        student_logits = student(input_ids=ids, attention_mask=mask).logits
        loss = _distill_loss(student_logits, teacher_logits, mask, objective)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append({"step": step, "loss": loss.item()})
    student.train(was_training)
    return history


def mean_kl(teacher: nn.Module, student: nn.Module, sequences: list[list[int]]) -> float:
    """Mean over tokens of KL(teacher || student): the fidelity number the compress stage reports."""
    return mean_token_kl(teacher, student, sequences)


# ----------------------------------------------------------------- export


@torch.no_grad()
def materialize(model: PreTrainedModel) -> PreTrainedModel:
    """A plain copy of a Bit-Delta model: ``base + alpha * S`` written into ordinary weights.

    For generation, evaluation or export with tools that know nothing of Bit-Delta. Tied heads are
    re-tied to the merged embedding, so ``save_pretrained`` stores the pair once.
    """
    plain = copy.deepcopy(model)
    merged: dict[str, nn.Parameter] = {}
    for name, module in _bitdelta_modules(plain).items():
        weight = nn.Parameter(module.effective_weight().to(module.weight_dtype), requires_grad=False)
        merged[name] = weight
        if isinstance(module, BitDeltaLinear):
            out_features, in_features = module.shape
            bias = module.bias is not None
            plain_module = nn.Linear(in_features, out_features, bias=bias, device="meta")
            plain_module.weight = weight
            if bias:
                plain_module.bias = nn.Parameter(module.bias.to(module.weight_dtype), requires_grad=False)
        else:
            plain_module = nn.Embedding(*module.shape, padding_idx=module.padding_idx, device="meta")
            plain_module.weight = weight
        _set_module(plain, name, plain_module)
    for name, module in list(plain.named_modules()):
        if isinstance(module, TiedBitDeltaHead):
            out_features, in_features = module.owner.shape
            head = nn.Linear(in_features, out_features, bias=False, device="meta")
            head.weight = merged[module.owner_name]
            _set_module(plain, name, head)
    if hasattr(plain, _DENSE_ATTR):
        delattr(plain, _DENSE_ATTR)
    return plain


# ----------------------------------------------------------------- save / load


@torch.no_grad()
def base_weights_hash(model: nn.Module) -> str:
    """sha256 over the sorted state_dict's names, dtypes, shapes and bytes; a tied tensor counts once."""
    digest = hashlib.sha256()
    seen: set[tuple] = set()
    for name, tensor in sorted(model.state_dict().items()):
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_bitdelta(model: nn.Module, out_dir: Path | str, base_hash: str) -> Path:
    """Write the delta of a :func:`build_bitdelta_model` model to ``out_dir/bitdelta.safetensors``.

    Per delta'd module ``<name>.signs`` (uint8), ``<name>.alpha`` (fp32, shape [1]) and
    ``<name>.bias``; dense tensors under their own names in fp32. Metadata: the format tag, the
    base's sha256, each delta's shape and the tied heads (``{alias: owner}``). Returns the path.
    """
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name, module in _bitdelta_modules(model).items():
        shapes[name] = list(module.shape)
        tensors[f"{name}.signs"] = module.signs.detach().cpu().contiguous()
        tensors[f"{name}.alpha"] = module.alpha.detach().float().cpu().contiguous()
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias.detach().float().cpu().contiguous()
    tied = {n: m.owner_name for n, m in model.named_modules() if isinstance(m, TiedBitDeltaHead)}
    state = model.state_dict()
    for name in getattr(model, _DENSE_ATTR, ()):
        tensors[name] = state[name].detach().float().cpu().contiguous()
    path = Path(out_dir) / BITDELTA_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": FORMAT,
        "base_sha256": base_hash,
        "shapes": json.dumps(shapes),
        "tied": json.dumps(tied),
    }
    save_file(tensors, str(path), metadata=metadata)
    return path


def _bitdelta_path(model_or_path: Path | str) -> Path:
    path = Path(model_or_path)
    return path / BITDELTA_FILE if path.is_dir() else path


def _read_bitdelta(path: Path, tensors: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a Bit-Delta file, after checking its format tag."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no Bit-Delta weights")
    with safe_open(str(path), "pt") as fh:
        metadata = fh.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path}: format {metadata.get('format')!r}, expected {FORMAT!r}")
        return metadata, {key: fh.get_tensor(key) for key in fh.keys()} if tensors else {}


def load_bitdelta(model_dir: Path | str, base: PreTrainedModel) -> PreTrainedModel:
    """Rebuild the Bit-Delta model saved in ``model_dir`` on a copy of ``base`` (left untouched).

    Raises ``ValueError`` if the file's format tag is wrong or ``base`` is not the model the delta
    was made from (its :func:`base_weights_hash` differs from the recorded one).
    """
    path = _bitdelta_path(model_dir)
    metadata, tensors = _read_bitdelta(path)
    expected, got = metadata.get("base_sha256", ""), base_weights_hash(base)
    if expected != got:
        raise ValueError(
            f"{path} was made for base sha256 {expected[:12]}…, got {got[:12]}…: "
            "pass the base model it was built from"
        )
    model = copy.deepcopy(base)
    shapes = json.loads(metadata["shapes"])
    for name, shape in shapes.items():
        base_module = model.get_submodule(name)
        if list(base_module.weight.shape) != shape:
            raise ValueError(f"{path}: {name} has shape {shape}, the base {list(base_module.weight.shape)}")
        signs, alpha = tensors.pop(f"{name}.signs"), tensors.pop(f"{name}.alpha")
        bias = tensors.pop(f"{name}.bias", None)
        if type(base_module) is nn.Embedding:
            replacement = BitDeltaEmbedding(base_module.weight, signs, alpha, base_module.padding_idx)
        else:
            replacement = BitDeltaLinear(base_module.weight, signs, alpha, bias)
        _set_module(model, name, replacement)
    _tie_heads(model, {f"{a}.weight": f"{o}.weight" for a, o in json.loads(metadata["tied"]).items()})
    unknown = sorted(tensors.keys() - model.state_dict().keys())
    if unknown:
        raise ValueError(f"{path}: tensors the base model does not have: {unknown[:3]}")
    _copy_dense(model, tensors)
    _freeze_all_but_alphas(model)
    return model.eval()


# ----------------------------------------------------------------- size


def delta_bytes(model_or_path: nn.Module | Path | str) -> tuple[int, int]:
    """(fp16 bytes of the delta'd matrices, their Bit-Delta bytes) for a model or a saved file.

    fp16 is ``2 * numel`` per matrix; Bit-Delta is ``ceil(numel / 8)`` sign bytes plus a 4-byte
    alpha. A tied pair counts once; dense tensors and biases are left out of both sides.
    """
    if isinstance(model_or_path, nn.Module):
        shapes = [m.shape for m in _bitdelta_modules(model_or_path).values()]
    else:
        metadata, _ = _read_bitdelta(_bitdelta_path(model_or_path), tensors=False)
        shapes = list(json.loads(metadata["shapes"]).values())
    numels = [math.prod(shape) for shape in shapes]
    return sum(2 * n for n in numels), sum(math.ceil(n / 8) + 4 for n in numels)


def delta_compression_vs_fp16(model_or_path: nn.Module | Path | str) -> float:
    """How many times smaller the delta'd matrices are as Bit-Delta than as fp16 (at most 16)."""
    fp16, packed = delta_bytes(model_or_path)
    return fp16 / packed if packed else 0.0
