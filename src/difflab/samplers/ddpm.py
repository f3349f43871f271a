"""DDPM (Ho et al. 2020) and DDIM (Song et al. 2021) in sigma coordinates (tutorial §4.2, §5.1, §5.2)."""

from __future__ import annotations

import torch

from difflab.denoisers import DenoiserFn
from difflab.errors import DifflabError
from difflab.samplers.common import Callback, Generator, denoise, one_per_step, prepare, randn_like, register


@register("ddpm", "DDPM ancestral sampling (Ho et al. 2020, Alg. 2); variance=posterior|beta",
          nfe=one_per_step, stochastic=True, order=0)
@torch.no_grad()
def sample_ddpm(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    cond: torch.Tensor | None = None,
    generator: Generator = None,
    callback: Callback | None = None,
    variance: str = "posterior",
) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2; tutorial §4.2).

    Each step draws from p(x_t' | x_t) = N(mu~_t(x_t, x0_hat), var), the posterior q(x_t' | x_t, x0)
    (DDPM eq. 6-7) with x0 replaced by the network's estimate. In sigma coordinates its mean is a simple
    interpolation,
        mu~ = x0_hat + (sigma' / sigma)^2 (x - x0_hat),
    and the variance is either
        "posterior": beta~_t / abar_t' = sigma'^2 (1 - sigma'^2 / sigma^2)           (the lower bound, DDPM §3.2)
        "beta":      beta_t  / abar_t' = (sigma^2 - sigma'^2) (1 + sigma'^2) / (1 + sigma^2)  (the upper bound)
    with beta_t = 1 - abar_t / abar_t'. The last step (sigma' = 0) returns the mean, as in Algorithm 2.
    With the posterior variance this equals :func:`sample_ddim` with eta = 1.
    """
    if variance not in ("posterior", "beta"):
        raise DifflabError(f"unknown DDPM variance '{variance}' (choose 'posterior' or 'beta')")
    x, sigmas = prepare(x, sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(denoiser, x, sigma, cond, i, callback)
        ratio = (sigma_next / sigma) ** 2
        x = x0 + ratio * (x - x0)  # the posterior mean mu~
        if sigma_next > 0:
            if variance == "posterior":
                var = sigma_next**2 * (1 - ratio)
            else:
                var = (sigma**2 - sigma_next**2) * (1 + sigma_next**2) / (1 + sigma**2)
            x = x + var.sqrt() * randn_like(x, generator)
    return x


@register("ddim", "DDIM (Song et al. 2021); eta=0 deterministic ... eta=1 ancestral",
          nfe=one_per_step, stochastic=False, order=1)
@torch.no_grad()
def sample_ddim(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    cond: torch.Tensor | None = None,
    generator: Generator = None,
    callback: Callback | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song, Meng & Ermon 2021, eq. 12) on any subsequence of noise levels.

    In DDPM coordinates the update from t to t' is
        x_t' = sqrt(abar_t') x0_hat + sqrt(1 - abar_t' - s^2) eps_hat + s z,
        s = eta * sqrt((1 - abar_t') / (1 - abar_t)) * sqrt(1 - abar_t / abar_t')       (DDIM eq. 16).
    Divided by sqrt(abar_t') this becomes, with sigma' the next noise level,
        x' = x0_hat + sigma_down * eps_hat + sigma_up * z,
        sigma_up = eta * sigma' * sqrt(sigma^2 - sigma'^2) / sigma,  sigma_down = sqrt(sigma'^2 - sigma_up^2).
    eta = 0 is Euler's method on the probability-flow ODE (deterministic); eta = 1 is DDPM's ancestral step.
    """
    if not 0.0 <= eta <= 1.0:
        raise DifflabError(f"DDIM's eta must lie in [0, 1], got {eta}")
    x, sigmas = prepare(x, sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(denoiser, x, sigma, cond, i, callback)
        eps = (x - x0) / sigma  # the noise estimate eps_hat
        sigma_up = eta * sigma_next * (sigma**2 - sigma_next**2).sqrt() / sigma
        sigma_down = (sigma_next**2 - sigma_up**2).sqrt()
        x = x0 + sigma_down * eps
        if eta > 0 and sigma_next > 0:
            x = x + sigma_up * randn_like(x, generator)
    return x
