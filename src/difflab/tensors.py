"""Two small tensor helpers every part of difflab needs: noise levels as one value per example, and
broadcasting a per-example value over an image batch."""

from __future__ import annotations

import torch


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """``v`` with trailing singleton dimensions up to ``ndim`` dimensions: a per-example (N,) becomes (N, 1, 1, 1)
    to broadcast over a batch of images."""
    return v.reshape(*v.shape, *([1] * (ndim - v.ndim)))


def sigma_per_example(sigma, x: torch.Tensor, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """A noise level given as a number, a scalar tensor or one value per example -> (N,) on x's device,
    in ``dtype`` (float32 by default: sampler arithmetic; None keeps the given dtype)."""
    sigma = torch.as_tensor(sigma, device=x.device)
    if dtype is not None:
        sigma = sigma.to(dtype)
    return sigma.reshape(-1).expand(x.shape[0])
