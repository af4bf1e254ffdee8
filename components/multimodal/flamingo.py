"""Flamingo (Alayrac et al., 2022): a frozen vision encoder and a frozen LM joined by two trained pieces.

1. **Perceiver resampler.** A fixed set of learned latents cross-attends to the visual features
   (keys and values are the features *and* the latents, as in the paper), followed by a
   feed-forward layer, ``depth`` times. However many feature vectors an image has (a 3x3 or a
   7x7 map), and however many frames one media item has (each frame gets a learned frame
   embedding, then all are flattened together), the output is always ``num_latents`` tokens.
   A fixed 2-D sin/cos position code is added to each feature so "left of" survives the
   order-free attention.
2. **Gated cross-attention dense blocks**, inserted before every ``every``-th decoder layer of
   the frozen LM: ``y = y + tanh(a_attn) * CrossAttn(q=y, kv=visual)`` then
   ``y = y + tanh(a_ff) * FFN(y)``. Both gates start at 0, so at initialisation the model *is*
   the frozen LM, bit for bit (the same "start transparent" idea as LoRA's ``B = 0``).

**Media masking.** A sequence may interleave several images with text (``<image> A red car.
<image> A blue cat. <image> Describe:``). Each text token attends only to the visual tokens of
the most recent image at or before it; tokens before the first image attend to nothing (their
cross-attention output is zero). That is what lets few-shot prompts work.

The blocks enter through forward pre-hooks on the decoder layers, so the LM's own modules and
parameter names are untouched: the frozen weights can be compared bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from components.errors import PosttrainError
from components.multimodal.bridging import Row, grid_positions, left_pad
from components.multimodal.shapes import IMAGE_MARKER


@dataclass(frozen=True)
class FlamingoShape:
    """The bridge's sizes (``multimodal.flamingo`` in params.yaml)."""

    feature_dim: int = 1280
    dim: int = 128
    num_latents: int = 8
    depth: int = 1
    heads: int = 4
    every: int = 2
    ff_mult: int = 2
    max_frames: int = 8


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim))


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Multi-head scaled dot-product attention on (B, T, D); ``mask`` (B, Tq, Tk), True = may attend."""
    b, tq, d = q.shape
    split = lambda x: x.view(b, x.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(
        split(q), split(k), split(v), attn_mask=None if mask is None else mask[:, None]
    )
    return out.transpose(1, 2).reshape(b, tq, d)


class PerceiverLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ff_mult: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_media, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q, self.to_kv, self.to_out = (
            nn.Linear(dim, dim, bias=False),
            nn.Linear(dim, 2 * dim, bias=False),
            nn.Linear(dim, dim, bias=False),
        )
        self.ff = feed_forward(dim, ff_mult)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, lat = self.norm_media(media), self.norm_latents(latents)
        k, v = self.to_kv(torch.cat([x, lat], dim=1)).chunk(2, dim=-1)
        latents = latents + self.to_out(attend(self.to_q(lat), k, v, self.heads))
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """Visual features of any count -> exactly ``num_latents`` tokens per media item."""

    def __init__(self, shape: FlamingoShape) -> None:
        super().__init__()
        self.shape = shape
        self.project = nn.Linear(shape.feature_dim, shape.dim)
        self.latents = nn.Parameter(torch.randn(shape.num_latents, shape.dim) * 0.02)
        self.frame_embedding = nn.Parameter(torch.zeros(shape.max_frames, shape.dim))
        self.layers = nn.ModuleList(
            PerceiverLayer(shape.dim, shape.heads, shape.ff_mult) for _ in range(shape.depth)
        )
        self.norm = nn.LayerNorm(shape.dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, feature_dim) or (B, frames, N, feature_dim) -> (B, num_latents, dim)."""
        if features.dim() == 3:
            features = features[:, None]
        b, frames, n, _ = features.shape
        if frames > self.shape.max_frames:
            raise PosttrainError(
                f"{frames} frames in one media item; the resampler takes at most {self.shape.max_frames}"
            )
        x = self.project(features) + grid_positions(n, self.shape.dim).to(features.dtype)
        x = (x + self.frame_embedding[:frames, None]).reshape(b, frames * n, -1)
        latents = self.latents.expand(b, -1, -1)
        for layer in self.layers:
            latents = layer(x, latents)
        return self.norm(latents)


class GatedCrossAttentionBlock(nn.Module):
    """``y + tanh(a_attn) * CrossAttn(y, visual)``, then ``+ tanh(a_ff) * FFN(.)``; gates start at 0."""

    def __init__(self, lm_dim: int, visual_dim: int, heads: int, ff_mult: int) -> None:
        super().__init__()
        if lm_dim % heads:
            raise PosttrainError(f"multimodal.flamingo.heads: {heads} does not divide the LM width {lm_dim}")
        self.heads = heads
        self.norm = nn.LayerNorm(lm_dim)
        self.to_q = nn.Linear(lm_dim, lm_dim, bias=False)
        self.to_kv = nn.Linear(visual_dim, 2 * lm_dim, bias=False)
        self.to_out = nn.Linear(lm_dim, lm_dim, bias=False)
        self.ff = feed_forward(lm_dim, ff_mult)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self, y: torch.Tensor, visual: torch.Tensor, media_index: torch.Tensor, num_latents: int
    ) -> torch.Tensor:
        """``y`` (B, T, D); ``visual`` (B, M * num_latents, Dv); ``media_index`` (B, T): the image
        each token sees (-1: none yet)."""
        key_image = torch.arange(visual.shape[1]) // num_latents
        allowed = media_index[:, :, None] == key_image[None, None, :]
        sees = media_index >= 0
        safe = allowed | ~sees[:, :, None]  # an all-False row would be NaN; its output is zeroed below
        k, v = self.to_kv(visual).chunk(2, dim=-1)
        attn = self.to_out(attend(self.to_q(self.norm(y)), k.to(y.dtype), v.to(y.dtype), self.heads, safe))
        y = y + torch.tanh(self.attn_gate).to(y.dtype) * attn * sees[:, :, None].to(y.dtype)
        return y + torch.tanh(self.ff_gate).to(y.dtype) * self.ff(y)


def decoder_layers(lm: PreTrainedModel) -> nn.ModuleList:
    """The LM's stack of decoder layers (Llama family and most causal LMs: ``model.layers``)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        module: object = lm
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise PosttrainError(
        f"cannot find the decoder layers of {type(lm).__name__} to insert cross-attention into"
    )


class FlamingoLM(nn.Module):
    """A frozen causal LM with a Perceiver resampler and gated cross-attention blocks attached."""

    def __init__(self, lm: PreTrainedModel, shape: FlamingoShape, marker_ids: list[int], pad_id: int) -> None:
        super().__init__()
        self.lm = lm.requires_grad_(False)
        self.shape = shape
        self.marker_ids = marker_ids
        self.pad_id = pad_id
        self.resampler = PerceiverResampler(shape)
        layers = decoder_layers(lm)
        self.layer_ids = list(range(0, len(layers), shape.every))
        width = lm.config.hidden_size
        self.blocks = nn.ModuleDict(
            {
                str(i): GatedCrossAttentionBlock(width, shape.dim, shape.heads, shape.ff_mult)
                for i in self.layer_ids
            }
        )
        self._media: tuple[torch.Tensor, torch.Tensor] | None = None
        self._hooks = [
            layers[i].register_forward_pre_hook(self._hook(str(i)), with_kwargs=True) for i in self.layer_ids
        ]

    def _hook(self, key: str):  # noqa: ANN202 - a forward pre-hook
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if self._media is None:
                return None
            visual, media_index = self._media
            block = self.blocks[key]
            if args:
                return (block(args[0], visual, media_index, self.shape.num_latents), *args[1:]), kwargs
            kwargs["hidden_states"] = block(
                kwargs["hidden_states"], visual, media_index, self.shape.num_latents
            )
            return args, kwargs

        return hook

    def gates(self) -> dict[str, float]:
        """tanh of each gate: how much of each block currently reaches the LM."""
        out = {}
        for i, block in self.blocks.items():
            out[f"attn_{i}"] = float(torch.tanh(block.attn_gate).item())
            out[f"ff_{i}"] = float(torch.tanh(block.ff_gate).item())
        return out

    def sequence(self, row: Row) -> tuple[list[int], list[int]]:
        """(token ids, media index per token): a marker's tokens where each image sits."""
        ids: list[int] = []
        index: list[int] = []
        for k, piece in enumerate(row.pieces):
            if k > 0:
                ids += self.marker_ids
                index += [k - 1] * len(self.marker_ids)
            ids += piece
            index += [k - 1] * len(piece)
        return ids + row.answer, index + [len(row.pieces) - 2] * len(row.answer)

    def length(self, row: Row) -> int:
        return len(self.sequence(row)[0]) - len(row.answer)

    def forward_rows(self, rows: Sequence[Row]) -> torch.Tensor:
        seqs = [self.sequence(r) for r in rows]
        ids, mask, positions = left_pad([torch.tensor(s) for s, _ in seqs], self.pad_id)
        index, _, _ = left_pad([torch.tensor(m) for _, m in seqs], -1)
        most = max(len(r.images) for r in rows)
        if most == 0:
            return self.lm(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        # one resampler pass over every image in the batch; rows with fewer images pad with zeros
        flat = torch.stack([img for r in rows for img in r.images])
        tokens = self.resampler(flat)
        visual = torch.zeros(len(rows), most * self.shape.num_latents, self.shape.dim, dtype=tokens.dtype)
        at = 0
        for i, r in enumerate(rows):
            n = len(r.images)
            visual[i, : n * self.shape.num_latents] = tokens[at : at + n].reshape(-1, self.shape.dim)
            at += n
        self._media = (visual, index)
        try:
            return self.lm(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        finally:
            self._media = None


def marker_ids(tokenizer) -> list[int]:  # noqa: ANN001 - a tokenizer
    """The token ids of the ``<image>`` marker text that stands where each image was."""
    return list(tokenizer(IMAGE_MARKER, add_special_tokens=False)["input_ids"])
