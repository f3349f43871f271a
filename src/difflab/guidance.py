"""Denoiser wrappers: each takes a denoiser and returns a denoiser, so it works with every sampler."""

from __future__ import annotations

import math

import torch

from difflab.conditioning import Cond, cond_cat, cond_expand, cond_to
from difflab.denoisers import DenoiserFn
from difflab.errors import DifflabError
from difflab.tensors import append_dims, sigma_per_example


def clip_x0(denoiser: DenoiserFn, low: float = -1.0, high: float = 1.0) -> DenoiserFn:
    """Static thresholding: clamp the x0 estimate to the data range [low, high] (DDPM's "clip_denoised").

    The sampler then derives its noise estimate from the clamped x0, so both stay consistent."""

    def clipped(x: torch.Tensor, sigma: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        return denoiser(x, sigma, cond).clamp(low, high)

    return clipped


def dynamic_threshold(denoiser: DenoiserFn, percentile: float = 0.995, max_value: float = 1.0) -> DenoiserFn:
    """Dynamic thresholding (Saharia et al. 2022, "Imagen", §2.3; tutorial §8.2 "动态阈值").

    Per image, s = the ``percentile`` quantile of |x0_hat|; if s > max_value, x0_hat is clamped to [-s, s]
    and divided by s / max_value, so saturated pixels are pushed inward instead of clipped flat. With
    s <= max_value the estimate is only clamped to [-max_value, max_value] (static thresholding)."""
    if not 0.0 < percentile <= 1.0:
        raise DifflabError(f"the thresholding percentile must lie in (0, 1], got {percentile}")

    def thresholded(x: torch.Tensor, sigma: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        x0 = denoiser(x, sigma, cond)
        s = torch.quantile(x0.abs().flatten(1).float(), percentile, dim=1)  # (N,)
        s = append_dims(s.clamp(min=max_value), x0.ndim)
        return x0.clamp(-s, s) * (max_value / s)

    return thresholded


# ---------------------------------------------------------------------------------------------------------
# Classifier-free guidance (Ho & Salimans 2022, eq. 6), written on x0 estimates:
#
#     D_w(x, sigma, y) = D(x, sigma, null) + w * (D(x, sigma, y) - D(x, sigma, null))
#
# w = 0 is the unconditional model, w = 1 the conditional one, w > 1 extrapolates away from the
# unconditional estimate. (The paper writes eps_w = (1 + w') eps_c - w' eps_u, i.e. w = 1 + w'.) Because
# eps = (x - D) / sigma is affine in D for fixed x and sigma, guiding x0, eps or v gives the same update.
# ---------------------------------------------------------------------------------------------------------


def classifier_free_guidance(denoiser: DenoiserFn, scale: float, *, null_cond: Cond, rescale: float = 0.0) -> DenoiserFn:
    """Classifier-free guidance of a conditional denoiser trained with condition dropout.

    ``null_cond`` is the condition the model learned as "no condition", for one example (the conditioner's
    ``null()``: the null class for class labels, the empty prompt for text). The conditional and unconditional
    estimates come from ONE network call on a batch of 2N. ``rescale`` in [0, 1] is guidance rescale (Lin et al.
    2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", §3.4 eq. 15-16): the guided x0 is
    rescaled to the per-image standard deviation of the conditional x0, then mixed with the plain guided x0 in
    proportion ``rescale``; it curbs the over-saturation of large scales. Unlike the linear guidance step, the
    rescale depends on the space it acts in: here it acts on the x0 estimate (what it is meant to protect: the
    image's contrast), where the paper and diffusers apply it to the network output (v or eps), which contains
    x as well. Without a condition (``cond=None``) the denoiser runs unconditionally."""
    if not (math.isfinite(scale) and scale >= 0):
        raise DifflabError(f"the guidance scale must be a finite number >= 0, got {scale}")
    if not 0.0 <= rescale <= 1.0:
        raise DifflabError(f"guidance rescale must lie in [0, 1], got {rescale}")

    nulls: dict = {}  # the null condition per (device, batch size), copied to the device once, not every step
    built: dict = {}  # the conditions of the doubled batch, built once per batch of conditions and reused every step

    def conditions(cond: Cond, x: torch.Tensor) -> Cond:
        where = (x.device, x.shape[0])
        if where not in nulls:
            nulls[where] = cond_to(cond_expand(null_cond, x.shape[0]), x.device)
        null = nulls[where]
        if cond is None:
            return null
        if built.get("cond") is not cond or built.get("where") != where:
            built.update(cond=cond, where=where, value=cond_cat([cond_to(cond, x.device), null]))
        return built["value"]

    def guided(x: torch.Tensor, sigma: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        n = x.shape[0]
        if cond is None:
            return denoiser(x, sigma, conditions(None, x))
        if scale == 1:  # exactly the conditional estimate (rescale then changes nothing): no unconditional half
            return denoiser(x, sigma, cond)
        sigma = sigma_per_example(sigma, x, dtype=None)
        both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), conditions(cond, x))
        x0_cond, x0_uncond = both[:n], both[n:]
        x0 = x0_uncond + scale * (x0_cond - x0_uncond)  # (N, C, H, W)  Ho & Salimans eq. 6
        if rescale > 0:
            dims = tuple(range(1, x.ndim))
            ratio = x0_cond.std(dim=dims, keepdim=True) / x0.std(dim=dims, keepdim=True).clamp(min=1e-8)
            x0 = rescale * (x0 * ratio) + (1 - rescale) * x0  # Lin et al. eq. 15-16
        return x0

    return guided


# ---------------------------------------------------------------------------------------------------------
# Classifier guidance (Dhariwal & Nichol 2021, §4; tutorial §8.2 "分类器引导").
#
# By Tweedie's formula the denoiser is a score: D(x, sigma) = x + sigma^2 grad_x log p_sigma(x). Bayes' rule
# gives grad log p_sigma(x | y) = grad log p_sigma(x) + grad log p_sigma(y | x), so
#
#     D(x, sigma | y) = D(x, sigma) + sigma^2 grad_x log p_sigma(y | x)
#
# exactly; a guidance scale s multiplies the classifier term (sharpening p(y | x) to p(y | x)^s). This is
# D&N's "score correction" eps_hat - sqrt(1 - abar) s grad_{x_t} log p (their Algorithm 2) written in sigma
# coordinates, and it serves every sampler: ODE solvers follow the guided score; in the ancestral DDPM step it
# becomes a shift of the posterior mean by (beta_t / sqrt(alpha_t)) s grad_{x_t} log p, the mean shift of their
# Algorithm 1 (which uses Sigma_t = beta~_t in place of beta_t / sqrt(alpha_t); both tend to beta dt as the
# steps shrink).
# ---------------------------------------------------------------------------------------------------------


def classifier_guidance(denoiser: DenoiserFn, classifier, scale: float = 1.0) -> DenoiserFn:
    """Guide an (unconditional) denoiser towards the classes in ``cond`` with a noise-aware classifier.

    ``classifier(x, sigma) -> logits (N, K)`` must take the same noisy ``x`` in sigma coordinates as the
    denoiser (see :class:`difflab.models.NoisyClassifier`) and be differentiable in ``x``. The inner
    denoiser is called without a condition. With the exact log p(y | x) and ``scale=1`` the result is the
    exact class-conditional denoiser."""
    if not (math.isfinite(scale) and scale >= 0):
        raise DifflabError(f"the classifier guidance scale must be a finite number >= 0, got {scale}")

    def guided(x: torch.Tensor, sigma: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        x0 = denoiser(x, sigma, None)
        if cond is None or scale == 0:
            return x0
        dtype = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 in exact-answer tests
        sigma = sigma_per_example(sigma, x, dtype)
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            xg = x.detach().to(dtype).requires_grad_(True)
            log_p = torch.log_softmax(classifier(xg, sigma).to(dtype), dim=-1)  # (N, K)
            picked = log_p.gather(1, cond.to(x.device).long().view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(picked, xg)  # (N, C, H, W)  grad_x log p_sigma(y | x)
        return x0 + scale * append_dims(sigma, x.ndim) ** 2 * grad.to(x0.dtype)

    return guided
