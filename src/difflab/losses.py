"""The one denoising loss (tutorial §2.4, §4.1) and its weightings.

    L = E_{x0, sigma, n} [ w(sigma) * || D(x0 + sigma n, sigma) - x0 ||^2 ]

For an eps-prediction network D = x - sigma * eps_hat, so ||D - x0||^2 = sigma^2 ||eps - eps_hat||^2 and the
weighting w = 1 / sigma^2 gives exactly the tutorial's objective ||eps - eps_theta(x_t, t)||^2 (DDPM eq. 14,
"L_simple"). Other weightings are the plain MSE of the other parameterizations' outputs:

    "eps": w = 1 / sigma^2               ||eps - eps_hat||^2
    "x0":  w = 1                         ||x0 - x0_hat||^2
    "v":   w = (1 + sigma^2) / sigma^2   ||v - v_hat||^2      (Salimans & Ho 2022)
"""

from __future__ import annotations

import torch

from difflab.denoisers import DenoiserFn
from difflab.errors import DifflabError
from difflab.schedules import add_noise

WEIGHTINGS = ("eps", "x0", "v")


def loss_weight(sigma: torch.Tensor, weighting: str) -> torch.Tensor:
    """w(sigma) for a weighting name (see module doc)."""
    if weighting == "eps":
        return sigma**-2
    if weighting == "x0":
        return torch.ones_like(sigma)
    if weighting == "v":
        return (1 + sigma**2) / sigma**2
    raise DifflabError(f"unknown loss weighting '{weighting}' (choose from {', '.join(WEIGHTINGS)})")


def denoising_loss(
    denoiser: DenoiserFn,
    x0: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    *,
    weighting: str = "eps",
    cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-example loss (N,): w(sigma) * mean over pixels of (D(x0 + sigma n, sigma) - x0)^2, in float32."""
    x = add_noise(x0, sigma, noise)  # the forward process, x = x0 + sigma n
    x0_hat = denoiser(x, sigma, cond).to(torch.float32)  # (N, C, H, W)
    err = (x0_hat - x0.to(torch.float32)).square().flatten(1).mean(1)  # (N,)
    return loss_weight(sigma.to(torch.float32), weighting) * err
