"""The one denoising loss (tutorial §2.4, §4.1):

    L = E_{x0, sigma, n} [ lambda(sigma) * || D(x0 + sigma n, sigma) - x0 ||^2 ]

The parameterization decides the distribution of sigma and the weight lambda
(:meth:`difflab.denoisers.Parameterization.loss_weight`). For an eps-prediction network D = x - sigma * eps_hat,
so ||D - x0||^2 = sigma^2 ||eps - eps_hat||^2 and lambda = 1 / sigma^2 gives exactly the tutorial's objective
||eps - eps_theta(x_t, t)||^2 (DDPM eq. 14, "L_simple"): eps-matching is a choice of weight, not a second code path.
"""

from __future__ import annotations

import torch

from difflab.conditioning import Cond
from difflab.denoisers import DenoiserFn
from difflab.schedules import add_noise


def denoising_loss(denoiser: DenoiserFn, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, *,
                   weight: torch.Tensor | None = None, cond: Cond = None) -> torch.Tensor:
    """Per-example loss (N,): lambda(sigma) * mean over pixels of (D(x0 + sigma n, sigma) - x0)^2, in float32.
    ``weight`` is lambda(sigma) (N,); None means 1 (the plain x0 error)."""
    x = add_noise(x0, sigma, noise)  # the forward process, x = x0 + sigma n
    x0_hat = denoiser(x, sigma, cond).to(torch.float32)  # (N, C, H, W)
    err = (x0_hat - x0.to(torch.float32)).square().flatten(1).mean(1)  # (N,)
    return err if weight is None else weight * err
