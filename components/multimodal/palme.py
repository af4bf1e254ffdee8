"""PaLM-E (Driess et al., 2023): visual features become soft tokens in the LM's own input sequence.

Each image's feature map is average-pooled to ``grid`` x ``grid`` cells (fewer tokens spend less
of the LM's context: 9 at the default 3, against 25 for a 5x5 map), each cell goes through a
projector (``linear`` or a two-layer ``mlp``) into the LM's embedding space, and the resulting
vectors are spliced into the text embeddings exactly where ``<image>`` was written. The LM reads
them like words: their order in the sequence carries the layout (row by row), and the LM's own
position encoding does the rest. The LM stays frozen (``lm: frozen``, only the projector learns)
or gets LoRA on every linear layer (``lm: lora``, PEFT's ``all-linear``); its own weights never change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from components.errors import PosttrainError
from components.multimodal.bridging import Row, left_pad

LM_MODES = ("frozen", "lora")
PROJECTORS = ("linear", "mlp")


@dataclass(frozen=True)
class PalmeShape:
    """The bridge's sizes (``multimodal.palme`` in params.yaml)."""

    feature_dim: int = 1280
    projector: str = "mlp"
    hidden: int = 512
    grid: int = 3
    lm: str = "frozen"
    lora_r: int = 8
    lora_alpha: int = 16


def pool_grid(features: torch.Tensor, grid: int) -> torch.Tensor:
    """(N, D) features of a square map -> (grid*grid, D), adaptive average pooling (kept if smaller)."""
    side = math.isqrt(features.shape[0])
    if side * side != features.shape[0] or side <= grid:
        return features
    fmap = features.T.reshape(1, -1, side, side)
    return F.adaptive_avg_pool2d(fmap, grid).flatten(2)[0].T


class PalmeLM(nn.Module):
    """Soft visual tokens, projected into the embedding space and spliced into the text."""

    def __init__(self, lm: PreTrainedModel, shape: PalmeShape) -> None:
        super().__init__()
        if shape.lm not in LM_MODES:
            raise PosttrainError(f"multimodal.palme.lm: {shape.lm!r} is not one of {', '.join(LM_MODES)}")
        if shape.projector not in PROJECTORS:
            raise PosttrainError(
                f"multimodal.palme.projector: {shape.projector!r} is not one of {', '.join(PROJECTORS)}"
            )
        lm.requires_grad_(False)
        if shape.lm == "lora":
            from peft import LoraConfig, get_peft_model

            lm = get_peft_model(
                lm,
                LoraConfig(
                    r=shape.lora_r,
                    lora_alpha=shape.lora_alpha,
                    lora_dropout=0.0,
                    target_modules="all-linear",
                ),
            )
        self.lm = lm
        self.shape = shape
        width = lm.config.hidden_size
        if shape.projector == "linear":
            self.projector: nn.Module = nn.Linear(shape.feature_dim, width)
        else:
            self.projector = nn.Sequential(
                nn.Linear(shape.feature_dim, shape.hidden), nn.GELU(), nn.Linear(shape.hidden, width)
            )
        # start the soft tokens at the scale of the LM's own word embeddings
        self.scale = float(lm.get_input_embeddings().weight.detach().norm(dim=-1).mean())
        self.norm = nn.LayerNorm(width, elementwise_affine=False)

    def tokens_per_image(self, features: torch.Tensor) -> int:
        return len(pool_grid(features, self.shape.grid))

    def visual_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """(N, feature_dim) -> (grid*grid, hidden): soft tokens with the word embeddings' typical norm."""
        projected = self.projector(pool_grid(features, self.shape.grid))
        return self.norm(projected) * (self.scale / math.sqrt(projected.shape[-1]))

    def length(self, row: Row) -> int:
        return sum(len(p) for p in row.pieces) + sum(self.tokens_per_image(img) for img in row.images)

    def embed(self, row: Row) -> torch.Tensor:
        table = self.lm.get_input_embeddings()
        parts = []
        for k, piece in enumerate(row.pieces):
            if k > 0:
                parts.append(self.visual_tokens(row.images[k - 1]).to(table.weight.dtype))
            parts.append(table(torch.tensor(piece, dtype=torch.long)))
        parts.append(table(torch.tensor(row.answer, dtype=torch.long)))
        return torch.cat(parts)

    def forward_rows(self, rows: Sequence[Row]) -> torch.Tensor:
        embeds, mask, positions = left_pad([self.embed(r) for r in rows], 0.0)
        return self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
