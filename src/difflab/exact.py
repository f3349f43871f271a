"""Exact answers: denoisers, classifiers and probability-flow solutions known in closed form.

For Gaussian data every quantity a diffusion model learns has a formula, so samplers, guidance and training
objectives can be tested against the truth instead of against another implementation:

    x0 ~ N(mean, std^2)   =>   D*(x, sigma) = E[x0 | x] = mean + std^2 / (std^2 + sigma^2) (x - mean)

and the probability-flow ODE (EDM eq. 4) scales x - mean with the marginal std sqrt(std^2 + sigma^2).
"""

from __future__ import annotations

import torch

from difflab.conditioning import Cond
from difflab.denoisers import DenoiserFn
from difflab.tensors import append_dims, sigma_per_example


def gaussian_denoiser(mean: float, std: float) -> DenoiserFn:
    """The exact denoiser for data x0 ~ N(mean, std^2), every pixel independent (see the module doc)."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        sigma = append_dims(sigma_per_example(sigma, x, x.dtype), x.ndim)
        return mean + std**2 / (std**2 + sigma**2) * (x - mean)

    return denoise


def gaussian_ode_solution(x: torch.Tensor, sigma: float, sigma_next: float, mean: float, std: float) -> torch.Tensor:
    """Exact solution of the probability-flow ODE dx/dsigma = (x - D*(x, sigma)) / sigma (EDM eq. 4)
    for Gaussian data: x - mean scales with the marginal std sqrt(std^2 + sigma^2)."""
    ratio = ((std**2 + sigma_next**2) / (std**2 + sigma**2)) ** 0.5
    return mean + (x - mean) * ratio


def gaussian_mixture_denoiser(means: torch.Tensor, std: float) -> DenoiserFn:
    """Exact denoisers for a class-labelled mixture: class y has x0 ~ N(means[y], std^2 I), classes equally likely.

    ``cond`` holds labels: label y < K gives the conditional denoiser ``means[y] + std^2 / (std^2 + sigma^2)
    (x - means[y])``; label K (the null class) or ``cond=None`` the unconditional one, the average of the
    conditional denoisers weighted by the class posterior p(y | x, sigma) (see :func:`gaussian_mixture_classifier`).
    The reference for testing guidance: both halves of classifier-free guidance are known exactly."""
    means = torch.as_tensor(means)
    classify = gaussian_mixture_classifier(means, std)

    def denoise(x: torch.Tensor, sigma: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        k = means.shape[0]
        mu = means.to(x)  # (K, C, H, W)
        s = append_dims(sigma_per_example(sigma, x, x.dtype), x.ndim + 1)  # (N, 1, 1, 1, 1)
        per_class = mu + std**2 / (std**2 + s**2) * (x.unsqueeze(1) - mu)  # (N, K, C, H, W)
        post = append_dims(torch.softmax(classify(x, sigma), dim=1), x.ndim + 1)  # (N, K, 1, 1, 1)
        uncond = (post * per_class).sum(1)  # (N, C, H, W)
        if cond is None:
            return uncond
        cond = cond.to(x.device).long()
        picked = per_class[torch.arange(x.shape[0], device=x.device), cond.clamp(max=k - 1)]  # (N, C, H, W)
        return torch.where(append_dims(cond == k, x.ndim), uncond, picked)

    return denoise


def gaussian_mixture_classifier(means: torch.Tensor, std: float):
    """The exact noisy classifier of that mixture: logits log p_sigma(x | y) + const, since
    x | y ~ N(means[y], (std^2 + sigma^2) I); softmax gives p(y | x, sigma). Differentiable in x."""
    means = torch.as_tensor(means)

    def logits(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        mu = means.to(x)
        var = std**2 + sigma_per_example(sigma, x, x.dtype) ** 2
        dist2 = (x.unsqueeze(1) - mu).flatten(2).pow(2).sum(-1)  # (N, K)
        return -dist2 / (2 * var.view(-1, 1))

    return logits
