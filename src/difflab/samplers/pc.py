"""Predictor–corrector sampling (tutorial §8.2 "噪声修正"; Song et al. 2021, "Score-Based Generative Modeling
through Stochastic Differential Equations", §4.2 and Algorithms 4/5).

Any sampler predicts the step sigma -> sigma'; then a few Langevin MCMC steps at sigma' correct x toward the
marginal p_sigma'. In sigma coordinates every model is a VE process, so Algorithm 4 (VE) applies as written,
and Algorithm 5 (VP) is the same with alpha_i = 1. The score comes from the denoiser (Tweedie's formula):

    s(x, sigma) = grad log p_sigma(x) = (D(x, sigma) - x) / sigma^2.
"""

from __future__ import annotations

from typing import Callable

import torch

from difflab.denoisers import DenoiserFn
from difflab.errors import DifflabError
from difflab.samplers.common import (
    Callback,
    Generator,
    denoise,
    get_sampler,
    prepare,
    randn_like,
    register,
    two_per_step,
)
from difflab.tensors import append_dims


@torch.no_grad()
def langevin_correct(denoiser: DenoiserFn, x: torch.Tensor, sigma: torch.Tensor, *, cond=None,
                     generator: Generator = None, callback: Callback | None = None, steps: int = 1,
                     snr: float = 0.16, step_index: int = 0) -> torch.Tensor:
    """``steps`` Langevin corrector steps at noise level ``sigma`` (Song et al. 2021, Algorithm 4, lines 7-10):

        s = (D(x, sigma) - x) / sigma^2,  eps = 2 (snr ||z|| / ||s||)^2,  x <- x + eps s + sqrt(2 eps) z,

    with the norms taken per image over all its pixels (Song et al.'s code averages them over the batch; per
    image keeps "same seed, same image" at any batch size). ``snr`` is the paper's r (0.16 for CIFAR-10 VE)."""
    for _ in range(steps):
        score = (denoise(denoiser, x, sigma, cond, step_index, callback) - x) / sigma**2
        z = randn_like(x, generator)
        z_norm, s_norm = (append_dims(t.flatten(1).norm(dim=1), x.ndim) for t in (z, score))
        eps = torch.where(s_norm > 0, 2 * (snr * z_norm / s_norm.clamp_min(1e-30)) ** 2, torch.zeros_like(s_norm))
        x = x + eps * score + (2 * eps).sqrt() * z
    return x


@register("pc", "predictor-corrector: any predictor + Langevin corrector steps (Song et al. 2021, Alg. 4/5)",
          nfe=two_per_step, stochastic=True, order=0)
@torch.no_grad()
def sample_pc(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, cond=None,
              generator: Generator = None, callback: Callback | None = None,
              predictor: str | Callable[..., torch.Tensor] = "euler",  # a sampler name or function
              corrector_steps: int = 1,               # Langevin steps after each predictor step (M in Alg. 4)
              snr: float = 0.16,                      # the signal-to-noise ratio r that sets the step size
              predictor_options: dict | None = None) -> torch.Tensor:
    """Predictor–corrector sampling (Song et al. 2021, Algorithms 4/5) with any sampler as the predictor.

    For each step sigma -> sigma' of the grid the predictor runs on the two-point grid [sigma, sigma'] (with
    ``predictor_options``), then, if sigma' > 0, :func:`langevin_correct` takes ``corrector_steps`` steps at
    sigma'. One-step predictors (euler, ddim, ddpm, heun, edm, ...) behave exactly as on the whole grid, so
    corrector_steps = 0 gives exactly the predictor's result; multistep predictors (dpmpp_2m, dpmpp_3m) lose
    their history this way and act as their first-order step (= DDIM). Evaluations: the predictor's plus
    ``corrector_steps`` per step to a non-zero sigma'.
    """
    if int(corrector_steps) != corrector_steps or corrector_steps < 0:
        raise DifflabError(f"corrector_steps must be a non-negative integer, got {corrector_steps}")
    if not snr > 0:
        raise DifflabError(f"snr must be positive, got {snr}")
    if predictor_options is not None and not isinstance(predictor_options, dict):
        raise DifflabError(f"predictor_options must be a dict of keyword arguments, got {type(predictor_options).__name__}")
    predict = get_sampler(predictor) if isinstance(predictor, str) else predictor
    if not callable(predict):
        raise DifflabError(f"predictor must be a sampler name or function, got {predictor!r}")
    x, sigmas = prepare(x, sigmas)
    for i in range(len(sigmas) - 1):
        step_callback = None if callback is None else (lambda _, s, x_, x0, i=i: callback(i, s, x_, x0))
        x = predict(denoiser, x, sigmas[i:i + 2], cond=cond, generator=generator, callback=step_callback,
                    **(predictor_options or {}))
        if sigmas[i + 1] > 0:
            x = langevin_correct(denoiser, x, sigmas[i + 1], cond=cond, generator=generator, callback=callback,
                                 steps=int(corrector_steps), snr=snr, step_index=i)
    return x
