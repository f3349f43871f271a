"""The denoiser interface, and the parameterizations that turn a raw network into a denoiser.

Every model is seen through ``D(x, sigma, cond) -> x0_hat`` in the sigma coordinates of Karras et al. 2022
(EDM): a noisy image is ``x = x0 + sigma * n``. A raw network F becomes a denoiser through preconditioning
(EDM eq. 7):

    D(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, c_noise(sigma))

A parameterization is one object that owns everything that depends on the family: c_skip, c_out, c_in and
c_noise, the sigma range, the noise a sampler starts from, the distribution of sigma during training and the
loss weight (EDM pairs VPPrecond with VPLoss and EDMPrecond with EDMLoss the same way). Two families:

* :class:`VPParameterization` -- a DDPM network on a discrete schedule (EDM Table 1, "VP" column, sigma_data = 1):
  c_in = 1 / sqrt(1 + sigma^2) (the network sees x_t = sqrt(abar_t) x), c_noise = the timestep of sigma, and
  the prediction type decides c_skip and c_out:

      eps  F = eps_hat:  x0 = x - sigma * eps_hat                        (DDPM eq. 15, in sigma coordinates)
      x0   F = x0_hat:   x0 = F
      v    F = v_hat:    x0 = x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) * v_hat   (Salimans & Ho 2022, §4)

* :class:`EDMParameterization` -- Karras et al. 2022, Table 1 "Ours": continuous sigma, sigma_data scaling,
  log-normal training sigma and the weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.

* :class:`ConsistencyParameterization` -- a consistency model (Song et al. 2023) on top of either: f(x, sigma_min) = x.

Nothing outside a parameterization branches on the family or the prediction type.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from difflab.conditioning import Cond
from difflab.errors import DifflabError
from difflab.schedules import NoiseSchedule, karras_sigmas, make_schedule, sampling_sigmas, sigma_to_t
from difflab.tensors import append_dims, sigma_per_example

PREDICTIONS = ("eps", "x0", "v")
PARAMETERIZATIONS = ("vp", "edm")  # what `difflab train` trains; distillation adds "consistency"


class DenoiserFn(Protocol):
    """Anything callable as ``D(x, sigma, cond) -> x0_hat``; sigma is a tensor of shape (N,)."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond = None) -> torch.Tensor: ...


class Parameterization:
    """What a family of diffusion models fixes besides the network (see the module doc). Subclasses define:"""

    kind: str
    sigma_min: float                 # the smallest and largest noise level the model knows
    sigma_max: float
    default_sampler: str             # what `difflab sample` uses when not told (the family's best)
    default_spacing: str

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in), each (N,), for noise levels sigma (N,)."""
        raise NotImplementedError

    def c_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        """The noise level as the network sees it (N,) float32."""
        raise NotImplementedError

    def sample_sigma(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """Training noise levels (n,) float32, drawn from ``generator``."""
        raise NotImplementedError

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) (N,) of the one loss lambda(sigma) ||D(x0 + sigma n, sigma) - x0||^2."""
        raise NotImplementedError

    def sampling_sigmas(self, steps: int, spacing: str | None = None, rho: float = 7.0) -> torch.Tensor:
        """A decreasing sigma grid (steps + 1,) float64 ending with 0."""
        raise NotImplementedError

    def prior_std(self, sigma_max: float) -> float:
        """Standard deviation of the noise a sampler starts from at ``sigma_max``."""
        raise NotImplementedError

    def default_steps(self, sampler: str) -> int:
        raise NotImplementedError

    def config(self) -> dict:
        """JSON that rebuilds it (:func:`parameterization_from_config`)."""
        raise NotImplementedError


class VPParameterization(Parameterization):
    """A DDPM-style network trained on the discrete timesteps of ``schedule`` with an eps, x0 or v target.

    Training draws t ~ U{0..T-1} (DDPM Algorithm 1, line 3) and uses sigma_t; the loss weight makes the loss the
    plain MSE of the network output (``weighting``, by default the prediction type itself):
    eps: 1 / sigma^2 (the tutorial's ||eps - eps_theta||^2), x0: 1, v: (1 + sigma^2) / sigma^2 (||v - v_hat||^2)."""

    kind = "vp"
    default_sampler, default_spacing = "ddim", "uniform"

    def __init__(self, schedule: NoiseSchedule, prediction: str = "eps", weighting: str | None = None):
        if prediction not in PREDICTIONS:
            raise DifflabError(f"unknown prediction type '{prediction}' (choose from {', '.join(PREDICTIONS)})")
        weighting = weighting or prediction
        if weighting not in PREDICTIONS:
            raise DifflabError(f"unknown loss weighting '{weighting}' (choose from {', '.join(PREDICTIONS)})")
        self.schedule, self.prediction, self.weighting = schedule, prediction, weighting
        self.sigma_min, self.sigma_max = schedule.sigmas[0].item(), schedule.sigmas[-1].item()
        self._tables: dict[torch.device, torch.Tensor] = {}

    def scalings(self, sigma):
        one = torch.ones_like(sigma)
        c_in = (1 + sigma**2).rsqrt()
        if self.prediction == "eps":
            return one, -sigma, c_in
        if self.prediction == "x0":
            return torch.zeros_like(sigma), one, c_in
        return c_in**2, -sigma * c_in, c_in  # v

    def c_noise(self, sigma):
        return sigma_to_t(sigma, self.schedule).to(torch.float32)  # the (interpolated) timestep of sigma

    def sample_sigma(self, n, generator, device):
        t = torch.randint(0, self.schedule.T, (n,), generator=generator, device=device)  # t ~ U{1..T}
        return self._sigma_table(torch.device(device))[t]

    def _sigma_table(self, device: torch.device) -> torch.Tensor:
        if device not in self._tables:
            self._tables[device] = self.schedule.sigmas.to(device=device, dtype=torch.float32)
        return self._tables[device]

    def loss_weight(self, sigma):
        if self.weighting == "eps":
            return sigma**-2
        if self.weighting == "x0":
            return torch.ones_like(sigma)
        return (1 + sigma**2) / sigma**2  # v

    def sampling_sigmas(self, steps, spacing=None, rho=7.0):
        return sampling_sigmas(self.schedule, steps, spacing or self.default_spacing, rho)

    def prior_std(self, sigma_max):
        # a DDPM starts from x_T ~ N(0, I), i.e. x = x_T / sqrt(abar_T): std sqrt(1 + sigma_max^2)
        return math.sqrt(1.0 + sigma_max**2)

    def default_steps(self, sampler):
        return self.schedule.T if sampler == "ddpm" else 50

    def config(self):
        options = {"schedule_options": dict(self.schedule.options)} if self.schedule.options else {}
        return {"kind": self.kind, "prediction": self.prediction, "weighting": self.weighting,
                "schedule": self.schedule.name, "timesteps": self.schedule.T, **options}


class EDMParameterization(Parameterization):
    """Karras et al. 2022 ("EDM"), Table 1, column "Ours", with the data's scale ``sigma_data``:

        c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)         c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
        c_in   = 1 / sqrt(sigma^2 + sigma_data^2)                c_noise = ln(sigma) / 4
        ln(sigma) ~ N(P_mean, P_std^2) in training               lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2

    These make the network's input and its training target unit-variance at every sigma (EDM Appendix B.6);
    lambda makes the effective weight of the target's error 1. Sampling: Heun (EDM Algorithm 1) on the rho = 7
    Karras grid between sigma_min and sigma_max, 18 steps (35 network evaluations), the paper's CIFAR-10 choice."""

    kind = "edm"
    default_sampler, default_spacing = "heun", "karras"

    def __init__(self, sigma_data: float = 0.5, *, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 p_mean: float = -1.2, p_std: float = 1.2):
        if not (math.isfinite(sigma_data) and sigma_data > 0):
            raise DifflabError(f"sigma_data (--sigma-data) must be a positive number, got {sigma_data}")
        if not 0 < sigma_min < sigma_max:
            raise DifflabError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
        if not p_std > 0:
            raise DifflabError(f"P_std must be positive, got {p_std}")
        self.sigma_data, self.sigma_min, self.sigma_max = float(sigma_data), float(sigma_min), float(sigma_max)
        self.p_mean, self.p_std = float(p_mean), float(p_std)

    def scalings(self, sigma):
        sd2 = self.sigma_data**2
        total = sigma**2 + sd2
        return sd2 / total, sigma * self.sigma_data * total.rsqrt(), total.rsqrt()

    def c_noise(self, sigma):
        return (sigma.log() / 4).to(torch.float32)

    def sample_sigma(self, n, generator, device):
        ln_sigma = torch.randn(n, generator=generator, device=device) * self.p_std + self.p_mean
        return ln_sigma.exp()

    def loss_weight(self, sigma):
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def sampling_sigmas(self, steps, spacing=None, rho=7.0):
        spacing = spacing or self.default_spacing
        if spacing not in ("karras", "trailing"):
            raise DifflabError(f"spacing '{spacing}' picks timesteps of a discrete schedule, but this EDM model has "
                               "continuous noise levels: use --spacing karras (the default) or trailing")
        return karras_sigmas(steps, self.sigma_min, self.sigma_max, rho, trailing=spacing == "trailing")

    def prior_std(self, sigma_max):
        return sigma_max  # EDM Algorithm 1, line 1: x_0 ~ N(0, sigma_max^2 I)

    def default_steps(self, sampler):
        return 18

    def config(self):
        return {"kind": self.kind, "sigma_data": self.sigma_data, "sigma_min": self.sigma_min,
                "sigma_max": self.sigma_max, "p_mean": self.p_mean, "p_std": self.p_std}


class ConsistencyParameterization(Parameterization):
    """A consistency model f(x, sigma) (Song et al. 2023, §3 and Appendix C) built on the teacher's parameterization
    ``base``, whose c_in and c_noise it keeps (so the student starts from the teacher's weights):

        f = c_skip(sigma) x + c_out(sigma) F_edm,   c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2),
                                                    c_out = (sigma - sigma_min) sigma_data / sqrt(sigma^2 + sigma_data^2)

    where F_edm = (D_base - c_skip_edm x) / c_out_edm is the network's output in EDM's units (c_skip_edm =
    sigma_data^2 / (sigma^2 + sigma_data^2), c_out_edm = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)). For an EDM
    base this is exactly Song et al.'s parameterization; for any base, f = x exactly at sigma = sigma_min (c_skip = 1,
    c_out = 0: the boundary condition), and f is close to the base denoiser D at large sigma. Written out:

        f = (c_skip + r (b_skip - c_skip_edm)) x + r b_out F(b_in x),   r = c_out / c_out_edm = (sigma - sigma_min) / sigma

    Sampled with the consistency sampler, one step by default (:func:`difflab.samplers.sample_consistency`)."""

    kind = "consistency"
    default_sampler, default_spacing = "consistency", "trailing"

    def __init__(self, base: Parameterization, sigma_data: float = 0.5):
        if not (math.isfinite(sigma_data) and sigma_data > 0):
            raise DifflabError(f"sigma_data must be a positive number, got {sigma_data}")
        if isinstance(base, ConsistencyParameterization):
            raise DifflabError("a consistency model's base must be a diffusion parameterization (vp or edm)")
        self.base, self.sigma_data = base, float(sigma_data)
        self.sigma_min, self.sigma_max = base.sigma_min, base.sigma_max

    def scalings(self, sigma):
        b_skip, b_out, b_in = self.base.scalings(sigma)
        sd2, shifted = self.sigma_data**2, sigma - self.sigma_min  # exactly 0 at sigma_min (same float32 rounding)
        c_skip = sd2 / (shifted**2 + sd2)
        r = shifted / sigma  # c_out / c_out_edm
        return c_skip + r * (b_skip - sd2 / (sigma**2 + sd2)), r * b_out, b_in

    def c_noise(self, sigma):
        return self.base.c_noise(sigma)

    def sample_sigma(self, n, generator, device):
        return self.base.sample_sigma(n, generator, device)

    def loss_weight(self, sigma):
        return torch.ones_like(sigma)

    def sampling_sigmas(self, steps, spacing=None, rho=7.0):
        return self.base.sampling_sigmas(steps, spacing or self.default_spacing, rho)

    def prior_std(self, sigma_max):
        return self.base.prior_std(sigma_max)

    def default_steps(self, sampler):
        return 1 if sampler == "consistency" else self.base.default_steps(sampler)

    def config(self):
        return {"kind": self.kind, "sigma_data": self.sigma_data, "base": self.base.config()}


def parameterization_from_config(config: dict) -> Parameterization:
    """Rebuild a parameterization from its :meth:`Parameterization.config` JSON (one-line errors)."""
    config = dict(config)
    kind = config.pop("kind", None)
    try:
        if kind == "vp":
            schedule = make_schedule(config.pop("schedule"), config.pop("timesteps"),
                                     **config.pop("schedule_options", {}))
            return VPParameterization(schedule, **config)
        if kind == "edm":
            return EDMParameterization(**config)
        if kind == "consistency":
            return ConsistencyParameterization(parameterization_from_config(config.pop("base")), **config)
    except (KeyError, TypeError) as e:
        raise DifflabError(f"the {kind} parameterization in the model config is incomplete or has unknown "
                           f"fields: {e}") from None
    raise DifflabError(f"unknown parameterization {kind!r} (choose from {', '.join(PARAMETERIZATIONS)}, consistency)")


class Denoiser(nn.Module):
    """A raw network ``net(x, c_noise, cond)`` and a parameterization, seen as ``D(x, sigma, cond) -> x0_hat``.

    The preconditioning arithmetic is float32; the network runs in its own dtype (e.g. under bf16 autocast)."""

    def __init__(self, net: nn.Module, parameterization: Parameterization):
        super().__init__()
        self.net, self.parameterization = net, parameterization

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        sigma = sigma_per_example(sigma, x)  # (N,)
        c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in self.parameterization.scalings(sigma))
        out = self.net(c_in * x, self.parameterization.c_noise(sigma), cond).to(torch.float32)  # (N, C, H, W)
        return c_skip * x + c_out * out  # EDM eq. 7
