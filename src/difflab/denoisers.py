"""The denoiser interface and the preconditioning that turns a raw network into one.

Every model is seen through ``D(x, sigma, cond) -> x0_hat`` in the sigma coordinates of Karras et al.
2022 (EDM): a noisy image is ``x = x0 + sigma * eps``. A DDPM network trained on discrete timesteps fits
this with (EDM Table 1, "VP" column, sigma_data = 1):

    D(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, t(sigma))

    c_in  = 1 / sqrt(1 + sigma^2)     -> the network sees x_t = sqrt(abar_t) * x, as in DDPM
    t     = the timestep whose sigma_t equals sigma (interpolated in log-sigma in between)

and the parameterization decides only c_skip and c_out:

    eps-prediction  F = eps_hat:  x0 = x - sigma * eps_hat                      (DDPM eq. 15, in sigma coords)
    x0-prediction   F = x0_hat:   x0 = F
    v-prediction    F = v_hat:    x0 = x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) * v_hat
                                  (v = sqrt(abar) eps - sqrt(1 - abar) x0, Salimans & Ho 2022, §4)

Nothing outside :func:`preconditioning` branches on the prediction type.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from difflab.errors import DifflabError
from difflab.schedules import NoiseSchedule, sigma_to_t

PREDICTIONS = ("eps", "x0", "v")


class DenoiserFn(Protocol):
    """Anything callable as ``D(x, sigma, cond) -> x0_hat``; sigma is a tensor of shape (N,)."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor: ...


def preconditioning(sigma: torch.Tensor, prediction: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in) for a DDPM-style network with the given prediction type (see module doc)."""
    one = torch.ones_like(sigma)
    c_in = (1 + sigma**2).rsqrt()
    if prediction == "eps":
        return one, -sigma, c_in
    if prediction == "x0":
        return torch.zeros_like(sigma), one, c_in
    if prediction == "v":
        return c_in**2, -sigma * c_in, c_in
    raise DifflabError(f"unknown prediction type '{prediction}' (choose from {', '.join(PREDICTIONS)})")


class Denoiser(nn.Module):
    """Wraps a raw network ``net(x_t, t, class_labels)`` trained on a discrete schedule as a denoiser.

    The sampler arithmetic is float32; the network runs in its own dtype (e.g. under bf16 autocast).
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, prediction: str = "eps"):
        super().__init__()
        preconditioning(torch.zeros(1), prediction)  # validate early
        self.net = net
        self.schedule = schedule
        self.prediction = prediction

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1).expand(x.shape[0])
        c_skip, c_out, c_in = (c.view(-1, 1, 1, 1) for c in preconditioning(sigma, self.prediction))
        t = sigma_to_t(sigma, self.schedule).to(torch.float32)  # (N,)
        out = self.net(c_in * x, t, cond).to(torch.float32)  # (N, C, H, W)
        return c_skip * x + c_out * out


def gaussian_denoiser(mean: float, std: float) -> DenoiserFn:
    """The exact denoiser for data x0 ~ N(mean, std^2) (every pixel independent):

        D*(x, sigma) = E[x0 | x] = mean + std^2 / (std^2 + sigma^2) * (x - mean)

    A reference with a known answer: samplers driven by it can be checked against :func:`gaussian_ode_solution`.
    """

    def denoise(x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
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
    (x - means[y])``; label K (the "null" class) or ``cond=None`` the unconditional one, the average of the
    conditional denoisers weighted by the class posterior p(y | x, sigma) (see :func:`gaussian_mixture_classifier`).
    The reference for testing guidance: both halves of classifier-free guidance are known exactly."""
    means = torch.as_tensor(means)
    classify = gaussian_mixture_classifier(means, std)

    def denoise(x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        k = means.shape[0]
        mu = means.to(x)  # (K, C, H, W)
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0]).view(-1, 1, 1, 1, 1)
        per_class = mu + std**2 / (std**2 + s**2) * (x.unsqueeze(1) - mu)  # (N, K, C, H, W)
        post = torch.softmax(classify(x, sigma), dim=1).view(x.shape[0], k, 1, 1, 1)  # (N, K, 1, 1, 1)
        uncond = (post * per_class).sum(1)  # (N, C, H, W)
        if cond is None:
            return uncond
        cond = cond.to(x.device).long()
        picked = per_class[torch.arange(x.shape[0], device=x.device), cond.clamp(max=k - 1)]  # (N, C, H, W)
        return torch.where((cond == k).view(-1, 1, 1, 1), uncond, picked)

    return denoise


def gaussian_mixture_classifier(means: torch.Tensor, std: float):
    """The exact noisy classifier of that mixture: logits log p_sigma(x | y) + const, since
    x | y ~ N(means[y], (std^2 + sigma^2) I); softmax gives p(y | x, sigma). Differentiable in x."""
    means = torch.as_tensor(means)

    def logits(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        mu = means.to(x)
        var = std**2 + torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0]) ** 2
        dist2 = (x.unsqueeze(1) - mu).flatten(2).pow(2).sum(-1)  # (N, K)
        return -dist2 / (2 * var.view(-1, 1))

    return logits
