"""The consistency sampler (Song et al. 2023, Algorithm 1): one network evaluation per noise level.

A consistency model maps a noisy image at any sigma straight to the start of its ODE trajectory, so one evaluation
at sigma_max is a sample. The multistep form alternates denoising and re-noising on a decreasing list of noise
levels tau_1 > tau_2 > ...:

    x = f(x_T, sigma_max);   for each tau_n:  x_tau = x + sqrt(tau_n^2 - sigma_min^2) z,  x = f(x_tau, tau_n)

(sigma_min, the consistency model's smallest noise level, 0.002 for EDM and about 0.01 for a DDPM schedule, is
counted as 0 here: the noise added is tau instead of sqrt(tau^2 - sigma_min^2), larger by sigma_min^2 / (2 tau^2) of
tau -- 5e-3 of it at tau = 0.1 on a DDPM schedule, 2e-6 at tau = 5). With an ordinary diffusion denoiser this is
the "LCM" / "denoise then re-noise" sampler.
"""

from __future__ import annotations

import torch

from difflab.denoisers import DenoiserFn
from difflab.samplers.common import Callback, Generator, denoise, one_per_step, prepare, randn_like, register


@register("consistency", "consistency sampler (Song et al. 2023, Alg. 1): denoise, re-noise to the next sigma; "
          "1 step for a consistency model", nfe=one_per_step, stochastic=True, order=0)
@torch.no_grad()
def sample_consistency(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, cond=None,
                       generator: Generator = None, callback: Callback | None = None) -> torch.Tensor:
    """x0 = f(x, sigmas[0]); then for each further sigma > 0: x = x0 + sigma z, x0 = f(x, sigma). Returns x0."""
    x, sigmas = prepare(x, sigmas)
    x0 = denoise(denoiser, x, sigmas[0], cond, 0, callback)  # Alg. 1, line 1
    for i, sigma in enumerate(sigmas[1:-1], start=1):
        x = x0 + sigma * randn_like(x0, generator)  # line 4 (sigma_min ~ 0)
        x0 = denoise(denoiser, x, sigma, cond, i, callback)  # line 5
    return x0
