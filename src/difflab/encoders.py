"""Encoders: the map between pixels and the space a diffusion model works in (EDM2's ``training/encoders.py``).

A pixel-space model works on the images themselves; a latent model (tutorial §5.3, Rombach et al. 2022) on the
latents of an autoencoder. Training encodes images, sampling decodes what the sampler produced:

    x0 = encoder.encode(images_uint8)         # (N, C, H, W) uint8 -> the model's space, float32
    images = encoder.decode(x)                # the model's space -> pixels in [-1, 1]

Only pixel space is meaningful to clip (a latent has no fixed range), so :attr:`pixel_space` tells
:func:`difflab.generate.generate` whether to clamp the x0 estimate.
"""

from __future__ import annotations

import torch
from torch import nn

from difflab.data import to_model_range
from difflab.errors import DifflabError


class PixelEncoder(nn.Module):
    """The identity encoder of pixel-space models: uint8 pixels -> floats in [-1, 1] (``x / 127.5 - 1``) and back."""

    kind = "pixels"
    pixel_space = True

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return to_model_range(images)  # (N, C, H, W) float32 in [-1, 1]

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def model_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """The shape (C, H, W) the diffusion model works on for images of ``image_shape``."""
        return tuple(image_shape)

    def config(self) -> dict:
        return {"kind": self.kind}


def encoder_from_config(config: dict | None) -> PixelEncoder:
    """Rebuild the encoder a model config describes (None: pixels, as in configs written before encoders)."""
    if config is None or config.get("kind") == PixelEncoder.kind:
        return PixelEncoder()
    raise DifflabError(f"unknown encoder kind {config.get('kind')!r} in the model config")
