"""Stochastic samplers: each step removes more noise than the ODE would and adds fresh noise back.

They differ in how much noise is replaced per step: Euler-ancestral (= DDIM with eta, k-diffusion's
name), the EDM sampler with "churn" (Karras et al. 2022, Alg. 2), and DPM-Solver++(2M) SDE
(Lu et al. 2022, the SDE variant of the 2M update).
"""

from __future__ import annotations

import math

import torch

from difflab.denoisers import DenoiserFn
from difflab.errors import DifflabError
from difflab.samplers.common import (
    Callback,
    Generator,
    denoise,
    one_per_step,
    prepare,
    randn_like,
    register,
    two_per_step,
)
from difflab.samplers.ddpm import sample_ddim


@register("euler_ancestral", "Euler-ancestral (k-diffusion; = DDIM with eta=1)",
          nfe=one_per_step, stochastic=True, order=0)
def sample_euler_ancestral(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, cond=None,
                           generator: Generator = None, callback: Callback | None = None,
                           eta: float = 1.0) -> torch.Tensor:
    """Euler-ancestral: step down to sigma_down with the ODE, then add noise of std sigma_up, where
    sigma_up = eta sigma' sqrt(sigma^2 - sigma'^2) / sigma and sigma_down = sqrt(sigma'^2 - sigma_up^2).

    Written out, x + (sigma_down - sigma) (x - D) / sigma + sigma_up z = D + sigma_down eps_hat + sigma_up z,
    which is DDIM's update (DDIM eq. 12) in sigma coordinates; so it is implemented by it."""
    return sample_ddim(denoiser, x, sigmas, cond=cond, generator=generator, callback=callback, eta=eta)


@register("edm", "stochastic EDM sampler with churn (Karras et al. 2022, Alg. 2)",
          nfe=two_per_step, stochastic=True, order=0)
@torch.no_grad()
def sample_edm(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, cond=None,
               generator: Generator = None, callback: Callback | None = None,
               churn: float = 40.0, sigma_tmin: float = 0.05, sigma_tmax: float = 50.0,
               s_noise: float = 1.003) -> torch.Tensor:
    """The stochastic EDM sampler (Karras et al. 2022, Algorithm 2).

    Each step first raises the noise level from sigma to sigma_hat = sigma (1 + gamma) by adding noise of
    std sqrt(sigma_hat^2 - sigma^2) * s_noise (lines 4-6), with gamma = min(churn / N, sqrt(2) - 1) inside
    [sigma_tmin, sigma_tmax] and 0 outside, then takes a Heun step from sigma_hat to sigma' (lines 7-11).
    churn = 0 gives Heun's method. Defaults are the paper's ImageNet-64 choices, scaled for sigma coords."""
    if churn < 0:
        raise DifflabError(f"churn must be non-negative, got {churn}")
    x, sigmas = prepare(x, sigmas)
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        gamma = min(churn / n, math.sqrt(2) - 1) if sigma_tmin <= sigma <= sigma_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            x = x + (sigma_hat**2 - sigma**2).sqrt() * s_noise * randn_like(x, generator)  # (Alg. 2, l. 6)
        d = (x - denoise(denoiser, x, sigma_hat, cond, i, callback)) / sigma_hat  # (l. 7)
        x_euler = x + (sigma_next - sigma_hat) * d  # (l. 8)
        if sigma_next == 0:
            x = x_euler
            continue
        d_next = (x_euler - denoise(denoiser, x_euler, sigma_next, cond, i, callback)) / sigma_next  # (l. 10)
        x = x + (sigma_next - sigma_hat) * (d + d_next) / 2  # (l. 11)
    return x


@register("dpmpp_2m_sde", "DPM-Solver++(2M) SDE variant; eta=1 solves the reverse SDE",
          nfe=one_per_step, stochastic=True, order=0)
@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, cond=None,
                        generator: Generator = None, callback: Callback | None = None,
                        eta: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022; diffusers' "sde-dpmsolver++", midpoint rule).

    With h = lambda' - lambda and h_eta = (1 + eta) h,
        x' = (sigma'/sigma) e^{-eta h} x + (1 - e^{-h_eta}) (D + 1/(2r) (D - D_prev))
             + sigma' sqrt(1 - e^{-2 eta h}) z.
    eta = 0 is DPM-Solver++(2M); eta = 1 solves the reverse SDE."""
    if not 0.0 <= eta <= 1.0:
        raise DifflabError(f"eta must lie in [0, 1], got {eta}")
    x, sigmas = prepare(x, sigmas)
    old_x0, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(denoiser, x, sigma, cond, i, callback)
        if sigma_next == 0:
            x = x0
            break
        h = sigma.log() - sigma_next.log()
        eta_h = eta * h
        coef = -torch.expm1(-h - eta_h)  # 1 - e^{-(1 + eta) h}
        x = (sigma_next / sigma) * torch.exp(-eta_h) * x + coef * x0
        if old_x0 is not None:
            r = h_last / h
            x = x + 0.5 * coef * (x0 - old_x0) / r
        if eta > 0:
            x = x + sigma_next * (-torch.expm1(-2 * eta_h)).sqrt() * randn_like(x, generator)
        old_x0, h_last = x0, h
    return x
