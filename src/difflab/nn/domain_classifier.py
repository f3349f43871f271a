"""The domain classifier: a small image classifier whose penultimate layer serves as a feature extractor for
sample-quality metrics on datasets without Inception weights.

    x (N, C, H, W) in [-1, 1]
      --> stage 0: blocks[0] x (conv3x3, BatchNorm, ReLU) at H x W
      --> 2x2 max-pool --> stage 1: blocks[1] x (conv3x3, BatchNorm, ReLU) at H/2 x W/2 --> ... (one stage per entry)
      --> global average pool --> (N, channels[-1])
      --> linear, ReLU --> features (N, feature_dim)          # what FID-style metrics compare
      --> linear --> logits (N, num_classes)

Why so plain: the Inception-v3 weights that FID papers use cannot be downloaded everywhere, so difflab
trains and ships a few-hundred-kilobyte classifier per dataset (``benchmarks/train_domain_classifier.py``)
and measures generated images with its features. Numbers computed with it are only comparable with each
other, never with Inception FID in papers (see :mod:`difflab.metrics.domain`).

BatchNorm rather than GroupNorm: it trains these small nets faster and in eval mode it is a fixed per-channel
affine map, so a feature never depends on the other images in the batch. A checkpoint is the weights
(safetensors) plus ``config.to_dict()`` as JSON, which rebuilds the module with
``DomainClassifier(DomainClassifierConfig.from_dict(d))``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from difflab.errors import DifflabError


@dataclass(frozen=True)
class DomainClassifierConfig:
    """Everything needed to rebuild a :class:`DomainClassifier`; round-trips through JSON
    (``DomainClassifierConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c``)."""

    image_size: int                      # input side (square); inputs of other sizes are resized by the extractor
    in_channels: int = 1                 # image channels the network sees (the extractor turns RGB into luminance)
    num_classes: int = 10                # logits out
    channels: tuple[int, ...] = (32, 64, 128)  # conv width of each stage; the feature map halves between stages
    blocks: tuple[int, ...] = (2, 2, 1)  # conv-BN-ReLU blocks per stage (same length as channels)
    feature_dim: int = 128               # width of the penultimate layer, the extracted features
    dropout: float = 0.0                 # dropout on the features before the head (training only)

    def __post_init__(self) -> None:
        for name in ("channels", "blocks"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _validate(self)

    def to_dict(self) -> dict:
        """Plain JSON-able dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> DomainClassifierConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`DifflabError`."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DifflabError(f"classifier config has unknown keys {unknown}; known: {sorted(known)}")
        return cls(**d)


def _validate(c: DomainClassifierConfig) -> None:
    """Raise a one-line :class:`DifflabError` for a config that cannot build a sensible network."""
    for name in ("image_size", "in_channels", "num_classes", "feature_dim"):
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DifflabError(f"classifier {name} must be a positive integer, got {value!r}")
    for name in ("channels", "blocks"):
        values = getattr(c, name)
        if not values or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
            raise DifflabError(f"classifier {name} must be a non-empty list of positive integers, got {list(values)}")
    if len(c.channels) != len(c.blocks):
        raise DifflabError(f"classifier channels {list(c.channels)} and blocks {list(c.blocks)} need one entry per stage")
    smallest = c.image_size // 2 ** (len(c.channels) - 1)
    if smallest < 1:
        raise DifflabError(f"classifier image_size {c.image_size} is too small for {len(c.channels)} stages "
                           f"(each stage after the first halves it)")
    if not 0.0 <= c.dropout < 1.0:
        raise DifflabError(f"classifier dropout must be in [0, 1), got {c.dropout}")


class ConvBlock(nn.Sequential):
    """conv3x3 (no bias: BatchNorm adds one) -> BatchNorm -> ReLU; keeps the spatial size."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class DomainClassifier(nn.Module):
    """A compact CNN: conv stages with 2x2 max-pooling between them, global average pooling, a ReLU
    feature layer and a linear head. Inputs are floats in [-1, 1] at ``config.image_size``."""

    def __init__(self, config: DomainClassifierConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        ch = config.in_channels
        for i, (width, n) in enumerate(zip(config.channels, config.blocks)):
            if i > 0:
                layers.append(nn.MaxPool2d(2))  # floor: odd sizes drop their last row / column
            for _ in range(n):
                layers.append(ConvBlock(ch, width))
                ch = width
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(ch, config.feature_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (after the ReLU): ``(N, C, H, W) -> (N, feature_dim)``."""
        h = self.body(x)                    # (N, channels[-1], H / 2^(S-1), W / 2^(S-1))
        h = h.mean(dim=(2, 3))              # (N, channels[-1])  global average pool
        return torch.relu(self.fc(h))       # (N, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits: ``(N, C, H, W) -> (N, num_classes)``."""
        return self.head(self.dropout(self.features(x)))  # (N, num_classes)
