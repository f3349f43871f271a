"""Denoiser wrappers: each takes a denoiser and returns a denoiser, so it works with every sampler."""

from __future__ import annotations

import torch

from difflab.denoisers import DenoiserFn
from difflab.errors import DifflabError


def clip_x0(denoiser: DenoiserFn, low: float = -1.0, high: float = 1.0) -> DenoiserFn:
    """Static thresholding: clamp the x0 estimate to the data range [low, high] (DDPM's "clip_denoised").

    The sampler then derives its noise estimate from the clamped x0, so both stay consistent."""

    def clipped(x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return denoiser(x, sigma, cond).clamp(low, high)

    return clipped


def dynamic_threshold(denoiser: DenoiserFn, percentile: float = 0.995, max_value: float = 1.0) -> DenoiserFn:
    """Dynamic thresholding (Saharia et al. 2022, "Imagen", §2.3; tutorial §8.2 "动态阈值").

    Per image, s = the ``percentile`` quantile of |x0_hat|; if s > max_value, x0_hat is clamped to [-s, s]
    and divided by s / max_value, so saturated pixels are pushed inward instead of clipped flat. With
    s <= max_value the estimate is only clamped to [-max_value, max_value] (static thresholding)."""
    if not 0.0 < percentile <= 1.0:
        raise DifflabError(f"the thresholding percentile must lie in (0, 1], got {percentile}")

    def thresholded(x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        x0 = denoiser(x, sigma, cond)
        s = torch.quantile(x0.abs().flatten(1).float(), percentile, dim=1)  # (N,)
        s = s.clamp(min=max_value).view(-1, *([1] * (x0.ndim - 1)))
        return x0.clamp(-s, s) * (max_value / s)

    return thresholded
