"""Distillation (tutorial §8.1 "蒸馏"): a student that does in one step what its teacher does in two, or in many.

Two objectives, each a loss on top of a frozen teacher denoiser; :mod:`difflab.tasks.distill` trains them in the one
training loop. Everything here is in sigma coordinates (x = x0 + sigma n), where a DDIM (eta = 0) step from sigma
to sigma' with the x0 estimate D is

    x' = (sigma' / sigma) x + (1 - sigma' / sigma) D                                   (DDIM eq. 12, eta = 0)

**Progressive distillation** (Salimans & Ho 2022, Algorithm 2). The teacher takes two DDIM steps
sigma -> sigma_mid -> sigma'; the student must land at the same x' in one step, so its x0 estimate must be

    x_tilde = (x'_teacher - (sigma' / sigma) x) / (1 - sigma' / sigma)                  (Alg. 2, the target x~)

(the paper's (z'' - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t), divided through by alpha),
and the loss is the x0 error weighted by the truncated SNR, max(SNR, 1) = max(1 / sigma^2, 1) (their §4, "truncated
SNR weighting"). Each stage halves the steps; the student of one stage is the teacher of the next.

**Consistency distillation** (Song et al. 2023, Algorithm 2). A consistency function f(x, sigma) maps every point
of an ODE trajectory to its start at sigma_min (boundary condition f(x, sigma_min) = x, built into the
parameterization: :class:`difflab.denoisers.ConsistencyParameterization`). On an N-point Karras grid
sigma_min = s_1 < ... < s_N = sigma_max, for a random n,

    x_{n+1} = x0 + s_{n+1} z,   x_hat_n = one teacher ODE step s_{n+1} -> s_n (DDIM or Heun, guided if asked),
    L = d(f_theta(x_{n+1}, s_{n+1}), f_theta-(x_hat_n, s_n))                            (Song et al. eq. 7)

with theta- an EMA of theta (the target network) and d the pseudo-Huber distance sqrt(|a - b|^2 + c^2) - c
(Song & Dhariwal 2023, "Improved techniques", §3.3; c = 0.00054 sqrt(dim)).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from difflab.conditioning import Cond
from difflab.denoisers import DenoiserFn
from difflab.errors import DifflabError
from difflab.schedules import karras_sigmas
from difflab.tensors import append_dims

TeacherStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Cond], torch.Tensor]  # (x, sigma, sigma', cond)
TEACHER_SOLVERS = ("ddim", "heun")


def ddim_step(x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """x' = (sigma'/sigma) x + (1 - sigma'/sigma) x0_hat: one DDIM (eta = 0) = Euler step of the probability-flow
    ODE; per-example sigma (N,)."""
    ratio = append_dims(sigma_next / sigma, x.ndim)
    return ratio * x + (1 - ratio) * x0


# ---------------------------------------------------------------------------------------------------------
# Progressive distillation (Salimans & Ho 2022)


@torch.no_grad()
def progressive_target(teacher: DenoiserFn, x: torch.Tensor, sigmas: list[torch.Tensor], cond: Cond = None
                       ) -> torch.Tensor:
    """The student's target x0 for a step sigmas[0] -> sigmas[-1] (each (N,)) that the teacher takes as DDIM steps
    through every sigma in ``sigmas`` (two steps for a halving; one for a change of parameterization, where the
    target is the teacher's own x0 estimate). Salimans & Ho 2022, Algorithm 2, in sigma coordinates."""
    x_teacher = x
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x_teacher = ddim_step(x_teacher, teacher(x_teacher, sigma, cond).to(x.dtype), sigma, sigma_next)
    ratio = append_dims(sigmas[-1] / sigmas[0], x.ndim)
    return (x_teacher - ratio * x) / (1 - ratio)  # x~: one DDIM step with it lands on the teacher's x''


def truncated_snr_weight(sigma: torch.Tensor) -> torch.Tensor:
    """max(SNR, 1) with SNR = alpha^2 / sigma_vp^2 = 1 / sigma^2 (Salimans & Ho 2022, §4)."""
    return torch.clamp(sigma.double() ** -2, min=1.0).to(sigma.dtype)


def progressive_loss(student: DenoiserFn, teacher: DenoiserFn, x0: torch.Tensor, noise: torch.Tensor,
                     sigmas: list[torch.Tensor], cond: Cond = None) -> torch.Tensor:
    """Per-example loss (N,): max(SNR, 1) * mean over pixels of (student(x, sigma) - x~)^2, x = x0 + sigma n."""
    sigma = sigmas[0]
    x = x0 + append_dims(sigma, x0.ndim) * noise
    target = progressive_target(teacher, x, sigmas, cond)
    err = (student(x, sigma, cond).to(torch.float32) - target.to(torch.float32)).square().flatten(1).mean(1)
    return truncated_snr_weight(sigma) * err


# ---------------------------------------------------------------------------------------------------------
# Consistency distillation (Song et al. 2023)


def consistency_grid(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """The N noise levels of consistency training, decreasing from sigma_max to sigma_min (Karras eq. 5, which
    Song et al. 2023 use with N = 18 on CIFAR-10), float64 (N,)."""
    if n < 2:
        raise DifflabError(f"a consistency grid needs at least 2 points, got {n}")
    grid = karras_sigmas(n, sigma_min, sigma_max, rho)[:-1]
    grid[-1] = sigma_min  # exactly (x^(1/rho))^rho can round off): the boundary f(x, sigma_min) = x must apply
    return grid


def teacher_step(teacher: DenoiserFn, solver: str = "heun") -> TeacherStep:
    """One step of the teacher's probability-flow ODE from sigma to sigma' > 0 (per-example (N,) sigmas):
    ``ddim`` (Euler, 1 evaluation) or ``heun`` (Karras et al. 2022 Alg. 1, 2 evaluations; Song et al.'s choice)."""
    if solver not in TEACHER_SOLVERS:
        raise DifflabError(f"unknown teacher solver '{solver}' (choose from {', '.join(TEACHER_SOLVERS)})")

    @torch.no_grad()
    def step(x, sigma, sigma_next, cond=None):
        h = append_dims(sigma_next - sigma, x.ndim)
        d = (x - teacher(x, sigma, cond).to(x.dtype)) / append_dims(sigma, x.ndim)  # dx/dsigma (Karras eq. 4)
        x_euler = x + h * d
        if solver == "ddim":
            return x_euler
        d_next = (x_euler - teacher(x_euler, sigma_next, cond).to(x.dtype)) / append_dims(sigma_next, x.ndim)
        return x + h * (d + d_next) / 2

    return step


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """sqrt(|a - b|^2 + c^2) - c per example (N,), float32; c defaults to 0.00054 sqrt(dim) (Song & Dhariwal 2023):
    like L2 for small errors, like L1 for large ones, so a few outlier pixels do not dominate."""
    diff = (a.to(torch.float32) - b.to(torch.float32)).flatten(1)
    c = 0.00054 * math.sqrt(diff.shape[1]) if c is None else c
    return (diff.square().sum(1) + c * c).sqrt() - c


def consistency_loss(student: DenoiserFn, target: DenoiserFn, step: TeacherStep, x0: torch.Tensor,
                     noise: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, cond: Cond = None,
                     c: float | None = None) -> torch.Tensor:
    """Per-example consistency distillation loss (N,) for the grid interval sigma > sigma_next (each (N,)):
    d(f_theta(x, sigma), f_theta-(x_hat, sigma_next)) with x = x0 + sigma n and x_hat the teacher's ODE step
    (Song et al. 2023, Algorithm 2; lambda = 1)."""
    x = x0 + append_dims(sigma, x0.ndim) * noise
    x_hat = step(x, sigma, sigma_next, cond)
    with torch.no_grad():
        goal = target(x_hat, sigma_next, cond)
    return pseudo_huber(student(x, sigma, cond), goal, c)
