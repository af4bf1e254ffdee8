"""Knowledge distillation of a causal LM into a smaller student of the same family.

The student is the teacher with fewer decoder layers and/or a narrower MLP (:func:`student_config`);
hidden size, attention heads and vocabulary stay, so every embedding, attention and norm weight
has a teacher tensor of the same shape to start from. :func:`init_student` copies them from the
teacher layers a layer map picks, and the MLP either in full or, if narrower, its most
important channels. That start is much closer to the teacher than a random one, so a short
:func:`distill` run, which trains every student weight to match the teacher's next-token
distributions, recovers most of what the cut lost.

The loss is Hinton et al.'s (2015): ``alpha_kd · T² · KL(softmax(z_t / T) || softmax(z_s / T))``
averaged over real (unpadded) tokens, plus optionally ``alpha_ce`` times the student's ordinary
next-token cross-entropy. ``T > 1`` softens both distributions so the teacher's ranking of the
unlikely tokens carries signal; their gradients shrink as ``1 / T²``, which the ``T²`` undoes, so
the KD term's scale (and a good learning rate) hardly depends on ``T``.

Why a plain torch loop and not TRL: TRL 1.16 ships ``GKDTrainer`` only under
``trl.experimental.gkd`` (it imports, with an "unstable API" warning). It is built for
*on-policy* distillation: it samples student completions during training (``lmbda``), wants
chat-message datasets through its ChatML collator, and puts a whole ``SFTTrainer`` (accelerate,
Trainer callbacks, python ``random`` for the on-policy coin) between us and a dozen lines of
loss. What this stage needs is off-policy KD on fixed token sequences (the SFT calibration
text): no generation, one loss, batches drawn from a seeded ``torch.Generator``, bitwise
reproducible on the CPU, the same shape of loop as Bit-Delta's scale distillation.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PretrainedConfig, PreTrainedModel

from components.compression.batches import pad_right, seeded_batches
from components.compression.prune import mlp_channel_importance  # the same data-free score

LAYER_MAPS = ("uniform", "first")
# A decoder layer's tensor: "<prefix>layers.<index>.<rest>" (model.layers.3.mlp.up_proj.weight).
_LAYER_NAME = re.compile(r"^(?P<prefix>(?:.*?\.)?layers)\.(?P<index>\d+)\.(?P<rest>.+)$")
# MLP tensors whose output channels (rows) are the intermediate width, and the one whose inputs are.
_MLP_ROWS = ("mlp.gate_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.weight", "mlp.up_proj.bias")
_MLP_COLS = ("mlp.down_proj.weight",)


# ----------------------------------------------------------------- the student's shape


def _check_range(key: str, value: int, upper: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        raise ValueError(f"compress.distill.{key}: {value!r} is not an integer in [1, {upper}] ({what})")


def student_config(
    teacher_config: PretrainedConfig, num_layers: int | None, intermediate_size: int | None
) -> PretrainedConfig:
    """A copy of ``teacher_config`` with ``num_layers`` decoder layers and MLP width ``intermediate_size``.

    ``None`` keeps the teacher's value. Hidden size, heads and vocabulary are left alone so
    embeddings and attention weights can be copied as they are. ``num_layers`` must lie in
    [1, teacher's layers] and ``intermediate_size`` in [1, teacher's width]: a student is never
    bigger. A per-layer ``layer_types`` list is cut to the first ``num_layers`` entries here, and
    set to the mapped teacher layers' types by :func:`init_student`.
    """
    config = copy.deepcopy(teacher_config)
    if num_layers is not None:
        teacher_layers = teacher_config.num_hidden_layers
        _check_range("num_layers", num_layers, teacher_layers, f"the teacher has {teacher_layers} layers")
        config.num_hidden_layers = num_layers
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:num_layers]
    if intermediate_size is not None:
        width = teacher_config.intermediate_size
        _check_range("intermediate_size", intermediate_size, width, f"the teacher's MLP width is {width}")
        config.intermediate_size = intermediate_size
    return config


def select_layers(teacher_layers: int, student_layers: int, layer_map: str = "uniform") -> list[int]:
    """The teacher layer each student layer starts from, in order.

    ``"uniform"``: evenly spaced over the teacher, first and last included, the i-th being
    ``round(i · (L - 1) / (n - 1))`` with halves rounded up (4 -> 2: [0, 3]; 4 -> 3: [0, 2, 3];
    12 -> 4: [0, 4, 7, 11]). The first layer reads the embeddings and the last one writes what
    the final norm and LM head read, so keeping both keeps the student's ends compatible with
    the copied embeddings and head; the spacing keeps the depth's stages in between. One student
    layer takes layer 0. ``"first"``: layers ``0 .. n-1`` (plain truncation, the baseline).
    """
    _check_range("num_layers", student_layers, teacher_layers, f"the teacher has {teacher_layers} layers")
    if layer_map not in LAYER_MAPS:
        raise ValueError(f"compress.distill.layer_map: {layer_map!r} is not one of {', '.join(LAYER_MAPS)}")
    if layer_map == "first" or student_layers == 1:
        return list(range(student_layers))
    span, steps = teacher_layers - 1, student_layers - 1
    # floor(i * span / steps + 1/2) in integers: strictly increasing since span >= steps.
    return [(2 * i * span + steps) // (2 * steps) for i in range(student_layers)]


# ----------------------------------------------------------------- initialising from the teacher


def top_mlp_channels(mlp: nn.Module, width: int) -> torch.Tensor:
    """Indices of the ``width`` highest-scoring channels (:func:`mlp_channel_importance`), ascending.

    Kept in their original order (the order changes no output, but makes the copy easy to
    check); ties go to the lower index, so the choice is deterministic.
    """
    order = torch.argsort(mlp_channel_importance(mlp).detach(), descending=True, stable=True)
    return order[:width].sort().values


def _teacher_name(name: str, layers: Sequence[int]) -> tuple[str, str | None]:
    """(the teacher tensor a student tensor starts from, that teacher layer's module name or None)."""
    match = _LAYER_NAME.match(name)
    if match is None:
        return name, None
    layer = f"{match['prefix']}.{layers[int(match['index'])]}"
    return f"{layer}.{match['rest']}", layer


def _narrowed(name: str, source: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """The rows (gate/up) or columns (down) of an MLP tensor for the kept ``channels``."""
    if name.endswith(_MLP_ROWS):
        return source[channels.to(source.device)]
    if name.endswith(_MLP_COLS):
        return source[:, channels.to(source.device)]
    return source


@torch.no_grad()
def _copy_from_teacher(student: nn.Module, teacher: nn.Module, layers: Sequence[int]) -> None:
    """Write every student tensor from its teacher tensor (mapped layer, top MLP channels if narrower)."""
    teacher_state = teacher.state_dict()
    width = student.config.intermediate_size
    channels: dict[str, torch.Tensor] = {}  # teacher layer name -> kept MLP channels
    for name, tensor in student.state_dict(keep_vars=True).items():
        source_name, layer = _teacher_name(name, layers)
        if source_name not in teacher_state:
            raise ValueError(f"{name}: the teacher has no {source_name} to start from")
        source = teacher_state[source_name]
        if layer is not None and source.shape != tensor.shape and name.endswith(_MLP_ROWS + _MLP_COLS):
            if layer not in channels:
                channels[layer] = top_mlp_channels(teacher.get_submodule(f"{layer}.mlp"), width)
            source = _narrowed(name, source, channels[layer])
        if source.shape != tensor.shape:
            raise ValueError(
                f"{name}: shape {tuple(tensor.shape)} in the student, {tuple(source.shape)} from the "
                "teacher; only the number of layers and the MLP width may differ (see student_config)"
            )
        tensor.copy_(source)


def init_student(
    teacher: PreTrainedModel, config: PretrainedConfig, layer_map: str = "uniform"
) -> tuple[PreTrainedModel, list[int]]:
    """(a ``config``-shaped student initialised from ``teacher``, the teacher layer of each student layer).

    ``config`` is a :func:`student_config` of the teacher's config. The student is built as the
    teacher's class, on its device and in its dtype, and every tensor copied: embeddings, final
    norm and LM head as they are (a tied head stays tied, as the config says); student layer
    ``i`` from teacher layer ``layers[i]`` (:func:`select_layers`), its attention and norms in full
    and its MLP in full or, when narrower, the gate/up rows and down columns of the
    :func:`top_mlp_channels`. With the teacher's own depth and width the student computes
    exactly the teacher's logits. ``teacher`` and ``config`` are left untouched; the student is
    returned in eval mode.
    """
    teacher_layers = teacher.config.num_hidden_layers
    layers = select_layers(teacher_layers, config.num_hidden_layers, layer_map)
    width = teacher.config.intermediate_size
    _check_range("intermediate_size", config.intermediate_size, width, f"the teacher's MLP width is {width}")
    config = copy.deepcopy(config)
    teacher_types = getattr(teacher.config, "layer_types", None)
    if isinstance(teacher_types, list) and len(teacher_types) == teacher_layers:
        config.layer_types = [teacher_types[j] for j in layers]
    reference = next(teacher.parameters())
    student = type(teacher)(config).to(device=reference.device, dtype=reference.dtype)
    _copy_from_teacher(student, teacher, layers)
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.eval(), layers


# ----------------------------------------------------------------- distillation


def _batch(
    sequences: Sequence[Sequence[int]], loss_mask: Sequence[Sequence[int]] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, target_mask), right-padded; target_mask is loss_mask on real tokens."""
    length = max(len(s) for s in sequences)
    ids = pad_right(sequences, length)
    attention = pad_right([[1] * len(s) for s in sequences], length)
    targets = attention if loss_mask is None else pad_right(loss_mask, length) * attention
    return ids, attention, targets


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """``T² · KL(softmax(teacher / T) || softmax(student / T))``, mean over real tokens (fp32)."""
    real = attention_mask.bool()
    student = F.log_softmax(student_logits.float()[real] / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float()[real] / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


def ce_loss(student_logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, mean over the tokens with ``target_mask == 1`` (0 if there are none).

    Token ``t`` is predicted from position ``t - 1``, so a sequence's first token is never a target.
    """
    keep = target_mask[:, 1:].bool()
    if not keep.any():
        return student_logits.sum() * 0.0
    logits = student_logits[:, :-1].float()[keep]
    return F.cross_entropy(logits, input_ids[:, 1:][keep])


def _check_distill_args(
    sequences: Sequence[Sequence[int]],
    loss_mask: Sequence[Sequence[int]] | None,
    steps: int,
    learning_rate: float,
    batch_size: int,
    temperature: float,
    alpha_kd: float,
    alpha_ce: float,
) -> None:
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("distill: no sequences, or an empty one")
    if loss_mask is not None and [len(m) for m in loss_mask] != [len(s) for s in sequences]:
        raise ValueError("distill: loss_mask must have one entry per token of every sequence")
    if steps < 0:
        raise ValueError(f"compress.distill.steps: {steps} is negative")
    if not learning_rate > 0:
        raise ValueError(f"compress.distill.learning_rate: {learning_rate} is not positive")
    if batch_size < 1:
        raise ValueError(f"compress.distill.batch_size: {batch_size} is not positive")
    if not temperature > 0:
        raise ValueError(f"compress.distill.temperature: {temperature} is not positive")
    if alpha_kd < 0 or alpha_ce < 0 or alpha_kd + alpha_ce == 0:
        raise ValueError(
            f"compress.distill.alpha_kd / alpha_ce: {alpha_kd} / {alpha_ce}; both >= 0, not both 0"
        )


def distill(
    student: nn.Module,
    teacher: nn.Module,
    sequences: list[list[int]],
    loss_mask: list[list[int]] | None,
    steps: int,
    learning_rate: float,
    batch_size: int = 8,
    temperature: float = 2.0,
    alpha_kd: float = 1.0,
    alpha_ce: float = 0.0,
    seed: int = 0,
    progress: bool = False,
) -> list[dict[str, float]]:
    """Train every weight of ``student`` (AdamW) towards ``teacher`` on ``sequences``; the history.

    Per step: ``loss = alpha_kd · kd + alpha_ce · ce``, with ``kd`` = :func:`kd_loss` over every
    real token (the teacher's distribution is a signal on prompt tokens too) and ``ce`` =
    :func:`ce_loss` on the tokens where ``loss_mask`` is 1 (the convention of SFT's
    ``completion_mask``: 1 = token is a target), or on all tokens without one. Batches are right
    padded with an attention mask and drawn from a seeded ``torch.Generator`` shuffle, epoch
    after epoch, so a seed fixes the run. Both models run in eval mode (no dropout: the targets
    stay fixed) and the teacher under ``no_grad`` on its own device; the logits meet on the
    student's. Weight decay is 0: the student starts from the teacher's weights, and decay would
    pull them away from that start for no reason. A parameter with ``requires_grad=False`` stays
    as it is. Modes are restored at the end. Returns ``[{"step", "loss", "kd", "ce"}]``, each
    measured before that step's update.
    """
    _check_distill_args(
        sequences, loss_mask, steps, learning_rate, batch_size, temperature, alpha_kd, alpha_ce
    )
    modes = student.training, teacher.training
    student.eval()
    teacher.eval()
    device = next(student.parameters()).device
    teacher_device = next(teacher.parameters()).device
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.0)
    batches = seeded_batches(len(sequences), batch_size, seed)
    history: list[dict[str, float]] = []
    bar = tqdm(range(steps), desc="distill", disable=not progress)
    for step in bar:
        picked = next(batches)
        batch_mask = None if loss_mask is None else [loss_mask[i] for i in picked]
        ids, attention, targets = _batch([sequences[i] for i in picked], batch_mask)
        with torch.no_grad():
            teacher_logits = teacher(
                input_ids=ids.to(teacher_device), attention_mask=attention.to(teacher_device)
            ).logits.to(device)
        ids, attention, targets = ids.to(device), attention.to(device), targets.to(device)
        student_logits = student(input_ids=ids, attention_mask=attention).logits
        kd = kd_loss(student_logits, teacher_logits, attention, temperature)
        ce = ce_loss(student_logits, ids, targets)
        loss = alpha_kd * kd + alpha_ce * ce
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append({"step": step, "loss": loss.item(), "kd": kd.item(), "ce": ce.item()})
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
    student.train(modes[0])
    teacher.train(modes[1])
    return history


# ----------------------------------------------------------------- size


def param_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters in their own dtypes; a tied tensor (embedding = head) counts once."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
