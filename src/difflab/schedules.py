"""Noise schedules (tutorial §3.2) and the forward process q(x_t | x_0) (tutorial §2.2, §4.1).

Two coordinate systems describe the same noisy image:

* DDPM ("variance preserving") coordinates, as in the tutorial:
  ``x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps``                   (Ho et al. 2020, eq. 4)
* sigma coordinates (Karras et al. 2022, "EDM"), used by every denoiser and sampler here:
  ``x = x0 + sigma * eps``  with  ``x = x_t / sqrt(abar_t)``  and  ``sigma_t = sqrt((1 - abar_t) / abar_t)``.

Everything derived from the betas is computed once, in float64, by :func:`make_schedule`; sampling-time
sigma grids come from :func:`sampling_sigmas`.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from difflab.errors import DifflabError
from difflab.tensors import append_dims

# ---------------------------------------------------------------------------------------------------
# Beta schedules. Each returns betas (T,) in float64.


def betas_linear(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Linear schedule of DDPM (Ho et al. 2020, §4): beta_t from beta_start to beta_end."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def betas_quadratic(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Quadratic schedule: sqrt(beta_t) is linear (tutorial §3.2 "平方调度"; diffusers' "scaled_linear")."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2


def betas_cosine(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17):
    abar(t) = f(t) / f(0),  f(t) = cos^2(((t / T + s) / (1 + s)) * pi / 2),
    beta_t = 1 - abar(t) / abar(t - 1), clipped at max_beta to avoid the singularity at t = T."""
    t = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def betas_sigmoid(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Sigmoid schedule (Xu et al. 2022, GeoDiff): beta_t = beta_start + (beta_end - beta_start) * sigmoid(u),
    u linear from -6 to 6."""
    u = torch.linspace(-6, 6, T, dtype=torch.float64)
    return torch.sigmoid(u) * (beta_end - beta_start) + beta_start


BETA_SCHEDULES = {
    "linear": betas_linear,
    "cosine": betas_cosine,
    "quadratic": betas_quadratic,
    "sigmoid": betas_sigmoid,
}


# ---------------------------------------------------------------------------------------------------
# Derived quantities, all float64, each from one line of the paper.


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete-time DDPM schedule and every quantity derived from it (float64, shape (T,)).

    Index t = 0 .. T-1 corresponds to the paper's t = 1 .. T.
    """

    name: str
    betas: torch.Tensor
    alphas: torch.Tensor  # alpha_t = 1 - beta_t
    alphas_cumprod: torch.Tensor  # abar_t = prod_{s<=t} alpha_s                          (DDPM eq. 4)
    alphas_cumprod_prev: torch.Tensor  # abar_{t-1}, with abar_0 = 1
    posterior_variance: torch.Tensor  # beta~_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t  (DDPM eq. 7)
    posterior_mean_coef_x0: torch.Tensor  # sqrt(abar_{t-1}) beta_t / (1 - abar_t)           (DDPM eq. 7)
    posterior_mean_coef_xt: torch.Tensor  # sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t)    (DDPM eq. 7)
    sigmas: torch.Tensor  # sigma_t = sqrt((1 - abar_t) / abar_t), the EDM noise level
    options: tuple = ()   # the beta schedule's keyword arguments other than T, e.g. (("beta_end", 0.012),)

    @property
    def T(self) -> int:
        return len(self.betas)

    def on(self, device: torch.device, name: str = "sigmas") -> torch.Tensor:
        """One of the tables (``sigmas``, ``log_sigmas``, ``alphas_cumprod``, ...) on ``device``, copied there once:
        a copy per network call would make the host wait for the GPU every time."""
        tables = _ON_DEVICE.setdefault(id(self), {})
        key = (name, str(device))
        if key not in tables:
            if not tables:
                weakref.finalize(self, _ON_DEVICE.pop, id(self), None)
            tables[key] = (self.sigmas.log() if name == "log_sigmas" else getattr(self, name)).to(device)
        return tables[key]


_ON_DEVICE: dict[int, dict[tuple[str, str], torch.Tensor]] = {}  # NoiseSchedule.on's copies


def make_schedule(name: str = "linear", T: int = 1000, **kwargs) -> NoiseSchedule:
    """Build a :class:`NoiseSchedule` from a beta schedule name ("linear", "cosine", "quadratic", "sigmoid")."""
    if name not in BETA_SCHEDULES:
        raise DifflabError(f"unknown noise schedule '{name}' (choose from {', '.join(BETA_SCHEDULES)})")
    if T < 2:
        raise DifflabError(f"the number of diffusion steps T must be at least 2, got {T}")
    try:
        betas = BETA_SCHEDULES[name](T, **kwargs)
    except TypeError as e:
        raise DifflabError(f"bad options for the {name} noise schedule: {e}") from None
    alphas = 1.0 - betas
    abar = torch.cumprod(alphas, dim=0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    return NoiseSchedule(
        name=name,
        betas=betas,
        alphas=alphas,
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        posterior_variance=betas * (1.0 - abar_prev) / (1.0 - abar),
        posterior_mean_coef_x0=betas * abar_prev.sqrt() / (1.0 - abar),
        posterior_mean_coef_xt=(1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),
        sigmas=((1.0 - abar) / abar).sqrt(),
        options=tuple(sorted(kwargs.items())),
    )


# ---------------------------------------------------------------------------------------------------
# The forward process.


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Sample q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I)   (tutorial §2.2; DDPM eq. 4).

    ``t`` holds integer timesteps (N,). In sigma coordinates the same draw is ``x0 + sigma_t * noise``
    (see :func:`add_noise`), scaled by sqrt(abar_t)."""
    abar = append_dims(schedule.on(x0.device, "alphas_cumprod")[t].to(x0.dtype), x0.ndim)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def add_noise(x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The forward process in sigma coordinates: x = x0 + sigma * noise (Karras et al. 2022, eq. 1)."""
    return x0 + append_dims(sigma, x0.ndim) * noise


def sigma_to_t(sigma: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Map noise levels onto the (continuous) timestep axis of a discrete schedule.

    Exact for the schedule's own sigmas; in between, linear interpolation in log-sigma (k-diffusion's
    convention), so any sigma grid can drive a network trained on discrete timesteps."""
    sigmas, log_sigmas = schedule.on(sigma.device), schedule.on(sigma.device, "log_sigmas")
    log_sigma = sigma.to(torch.float64).clamp(min=sigmas[0], max=sigmas[-1]).log()
    idx = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
    lo, hi = log_sigmas[idx - 1], log_sigmas[idx]
    w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
    return (idx - 1).to(torch.float64) + w


# ---------------------------------------------------------------------------------------------------
# Sampling-time grids (tutorial §5.2, §8.1 子序列采样).

SPACINGS = ("uniform", "trailing", "leading", "karras")
DISCRETE_SPACINGS = ("uniform", "trailing", "leading")


def sampling_timesteps(T: int, steps: int, spacing: str = "uniform") -> torch.Tensor:
    """A decreasing subsequence of ``steps`` integer timesteps out of 0..T-1 (DDIM, Song et al. 2021, §4.2).

    uniform:  round(linspace(0, T-1, steps))                    (diffusers "linspace")
    trailing: round(k T / steps) - 1, k = steps .. 1  — always starts at the last timestep (Lin et al. 2024)
    leading:  arange(steps) * (T // steps)       — the original DDIM choice (diffusers' default)
    """
    if not 1 <= steps <= T:
        raise DifflabError(f"the number of sampling steps must be between 1 and T={T}, got {steps}")
    if spacing == "uniform":
        ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long()
    elif spacing == "trailing":
        ts = (torch.arange(steps, 0, -1, dtype=torch.float64) * T / steps).round().long() - 1
    elif spacing == "leading":
        ts = torch.arange(steps, dtype=torch.long) * (T // steps)
    else:
        raise DifflabError(f"unknown timestep spacing '{spacing}' (choose from {', '.join(DISCRETE_SPACINGS)})")
    return ts.sort(descending=True).values


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0, *,
                  trailing: bool = False) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
    i = 0 .. N-1, then 0. rho = 7 spends more steps at low noise, where detail forms. (steps + 1,) float64.

    ``trailing`` uses i/N instead of i/(N-1): the grid stops one step short of sigma_min before jumping to 0, like
    trailing timesteps; then every N-step grid is every other point of the 2N-step one (progressive distillation
    needs grids that nest)."""
    if steps < 1:
        raise DifflabError(f"the number of sampling steps must be at least 1, got {steps}")
    if not 0 < sigma_min < sigma_max:
        raise DifflabError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    if trailing:
        ramp = torch.arange(steps, dtype=torch.float64) / steps
    else:
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1, dtype=torch.float64)
    inv_max, inv_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (inv_max + ramp * (inv_min - inv_max)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def sampling_sigmas(schedule: NoiseSchedule, steps: int, spacing: str = "uniform", rho: float = 7.0) -> torch.Tensor:
    """The sigma grid (steps + 1,) float64 for a sampler: decreasing noise levels, then 0.

    "uniform", "trailing", "leading": the sigmas of a subsequence of the model's own timesteps; with
    steps == T this is the full DDPM chain sigma_T, ..., sigma_1, 0.
    "karras": :func:`karras_sigmas` between the schedule's smallest and largest sigma; the denoiser maps
    these onto the discrete model by interpolating the timestep in log-sigma (:func:`sigma_to_t`)."""
    if spacing == "karras":
        return karras_sigmas(steps, schedule.sigmas[0].item(), schedule.sigmas[-1].item(), rho)
    if spacing not in DISCRETE_SPACINGS:
        raise DifflabError(f"unknown spacing '{spacing}' (choose from {', '.join(SPACINGS)})")
    ts = sampling_timesteps(schedule.T, steps, spacing)
    return torch.cat([schedule.sigmas[ts], torch.zeros(1, dtype=torch.float64)])
