"""Denoiser wrappers: each takes a denoiser and returns a denoiser, so it works with every sampler."""

from __future__ import annotations

import torch

from difflab.denoisers import DenoiserFn


def clip_x0(denoiser: DenoiserFn, low: float = -1.0, high: float = 1.0) -> DenoiserFn:
    """Static thresholding: clamp the x0 estimate to the data range [low, high] (DDPM's "clip_denoised").

    The sampler then derives its noise estimate from the clamped x0, so both stay consistent."""

    def clipped(x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return denoiser(x, sigma, cond).clamp(low, high)

    return clipped
