"""An adaptive-step solver of the probability-flow ODE (tutorial §8.1 "自适应步长"): a tolerance, not a step count.

DPM-Solver-12 (Lu et al. 2022, "DPM-Solver", §5 and Algorithm 4 "adaptive step size"), written in the data
prediction form of DPM-Solver++ (Lu et al. 2022b, Algorithm 1) in lambda = -log(sigma). In sigma coordinates
the PF ODE is dx/dlambda = D(x, sigma) - x, whose linear part is integrated exactly:

    first order  (= DDIM):      x_low  = e^{-h} x - (e^{-h} - 1) D(x, sigma)
    second order (2S, r1 = 1/2): u = e^{-h/2} x - (e^{-h/2} - 1) D(x, sigma),  x_high = e^{-h} x - (e^{-h} - 1) D(u, sigma_mid)

Both share D(x, sigma), so a trial step costs one extra evaluation and a rejected step only that one. The pair
was chosen over Bogacki–Shampine RK23 in log(sigma) because the exponential integrator is exact for the linear
part (no stability limit at large sigma, where RK23 would have to creep) and both updates are convex
combinations of x and an x0 estimate, so a forced large step stays bounded.
"""

from __future__ import annotations

import math

import torch

from difflab.denoisers import DenoiserFn
from difflab.errors import DifflabError
from difflab.samplers.common import Callback, Generator, denoise, prepare, register

FAC_MIN, FAC_MAX = 0.2, 5.0  # bounds on how much one error estimate may shrink / grow the step (Hairer et al. II.4)
H_MAX = 1.0  # longest step in lambda: sigma shrinks at most e-fold per step (see sample_adaptive)


@register("adaptive", "adaptive-step DPM-Solver-12 with error control (Lu et al. 2022, Alg. 4); "
          "--tol instead of --steps, never more than --max-nfe evaluations",
          nfe=None, stochastic=False, order=2)
@torch.no_grad()
def sample_adaptive(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, cond=None,
                    generator: Generator = None, callback: Callback | None = None,
                    rtol: float = 0.05,            # relative tolerance (Lu et al.'s choice for images)
                    atol: float = 0.0078,          # absolute tolerance, ~1/128 of the data range [-1, 1]
                    max_nfe: int = 200,            # hard cap on network evaluations, the final denoise included
                    h_init: float | None = None,   # first trial step in lambda; None: 1/20 of the lambda range
                    safety: float = 0.9,           # theta in Lu et al.: h' = theta h E^{-1/2}
                    stats: dict | None = None) -> torch.Tensor:
    """DPM-Solver-12 with error control (Lu et al. 2022, Algorithm 4), data prediction, deterministic.

    ``sigmas`` only supplies the end points: it integrates from ``sigmas[0]`` to the smallest non-zero sigma,
    sigma_min, choosing its own steps; if the grid ends with 0 it then returns D(x, sigma_min) (one more
    evaluation), as every fixed-grid sampler does on its last step.

    A trial step h (in lambda) is accepted when E <= 1, with the error per sample (Lu et al. §5)
        E = || c' (x_high - x_low) / max(atol, rtol * max(c' |x_low|, c |x|)) ||_RMS,   c = 1 / sqrt(1 + sigma^2),
    taken as the max over the batch. The factor c measures the error where Lu et al. do, in the VP scale
    x_t = c x (what a DDPM network sees), so the tolerance does not follow |x| ~ sigma up to sigma_max.
    x_high is kept (local extrapolation), and either way the next trial is h' = h * clip(safety E^{-1/2}, 0.2, 5)
    (x_low is first order, its local error O(h^2)). Steps are capped at h = 1: at high noise D - mean
    grows like 1/sigma = e^lambda, and over longer steps both members of the pair miss that growth alike,
    so their difference underestimates the error (on Gaussian data the error then stops shrinking with rtol).
    Because E is a batch max, one image's steps depend on the others in the batch: the same seed does *not*
    give the same image at every batch size (it does to within the tolerance).

    Never more than ``max_nfe`` evaluations: when the budget left affords only k more second-order steps,
    no step is shorter than (distance left) / k, and such a forced step is accepted whatever its error; with
    no budget left, the remaining distance is one first-order step with the D already at hand.
    Pass a dict as ``stats`` to get ``accepted``, ``rejected`` and ``nfe`` back.
    """
    if not (rtol > 0 and atol > 0 and math.isfinite(rtol) and math.isfinite(atol)):
        raise DifflabError(f"rtol and atol must be positive and finite, got rtol={rtol}, atol={atol}")
    if not 0 < safety <= 1:
        raise DifflabError(f"safety must lie in (0, 1], got {safety}")
    if int(max_nfe) != max_nfe or max_nfe < 2:
        raise DifflabError(f"max_nfe must be an integer of at least 2 (one step plus the final denoise), got {max_nfe}")
    if h_init is not None and not h_init > 0:
        raise DifflabError(f"h_init must be positive, got {h_init}")
    x, sigmas = prepare(x, sigmas)
    denoise_last = bool(sigmas[-1] == 0)
    sigma, sigma_end = sigmas[0], sigmas[-2] if denoise_last else sigmas[-1]
    lam, lam_end = -math.log(sigma.item()), -math.log(sigma_end.item())
    reserve = int(denoise_last)  # evaluations kept back for the final denoise
    h = h_init if h_init is not None else (lam_end - lam) / 20
    nfe, accepted, rejected = 0, 0, 0
    x0 = None  # D(x, sigma) at the current point, once evaluated
    while lam < lam_end:
        if x0 is None:
            x0, nfe = denoise(denoiser, x, sigma, cond, accepted, callback), nfe + 1
        remaining = lam_end - lam
        affordable = (max_nfe - nfe - reserve + 1) // 2  # second-order steps the budget still pays for
        if affordable < 1:  # out of budget: a DDIM step to the end with the D already evaluated
            x, sigma, lam = math.exp(-remaining) * x - math.expm1(-remaining) * x0, sigma_end, lam_end
            accepted, x0 = accepted + 1, None
            break
        h, h_budget = min(h, H_MAX), remaining / affordable
        forced = h_budget > h  # the budget allows no shorter step: take it and keep it
        h = min(max(h, h_budget), remaining)
        lands = h >= remaining * (1 - 1e-9)
        sigma_next = sigma_end if lands else sigma.new_tensor(math.exp(-(lam + h)))
        sigma_mid = sigma.new_tensor(math.exp(-(lam + h / 2)))
        x_low = math.exp(-h) * x - math.expm1(-h) * x0  # DPM-Solver-1 = DDIM
        u = math.exp(-h / 2) * x - math.expm1(-h / 2) * x0
        x0_mid, nfe = denoise(denoiser, u, sigma_mid, cond, accepted, callback), nfe + 1
        x_high = math.exp(-h) * x - math.expm1(-h) * x0_mid  # DPM-Solver++(2S), r1 = 1/2
        c, c_next = (1 + sigma**2).rsqrt(), (1 + sigma_next**2).rsqrt()  # to the VP scale x_t = x / sqrt(1 + sigma^2)
        scale = torch.maximum(c_next * x_low.abs(), c * x.abs()).mul(rtol).clamp_min(atol)
        err = (c_next * (x_high - x_low) / scale).pow(2).flatten(1).mean(1).sqrt().max().item()
        err = err if math.isfinite(err) else math.inf
        if err <= 1 or forced:
            x, sigma, lam, x0 = x_high, sigma_next, lam_end if lands else lam + h, None
            accepted += 1
        else:
            rejected += 1
        h = h * min(FAC_MAX, max(FAC_MIN, safety * max(err, 1e-12) ** -0.5))
    if denoise_last:  # the last step of every sampler here: sigma_min -> 0 is x = D(x, sigma_min)
        if x0 is None:
            x0, nfe = denoise(denoiser, x, sigma, cond, accepted, callback), nfe + 1
        x = x0
    if stats is not None:
        stats.update(accepted=accepted, rejected=rejected, nfe=nfe)
    return x
