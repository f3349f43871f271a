"""What every sampler shares: the noise source, the one place the denoiser is called, grid checks.

Sampling functions (tutorial §4.2, §5.1, §5.2, §8.1) are each a loop over a decreasing sigma grid.

All samplers share one signature::

    sample_xxx(denoiser, x, sigmas, *, cond=None, generator=None, callback=None, **options) -> x0

``x`` is the starting noise already scaled to ``sigmas[0]``, ``sigmas`` ends with 0 (see
:func:`difflab.schedules.sampling_sigmas`), and ``denoiser(x, sigma, cond)`` returns the x0 estimate.
They work in sigma coordinates, ``x = x_t / sqrt(abar_t)``, where a DDPM/DDIM update has a particularly
simple form; the arithmetic is float32, the network runs in its own dtype.

``generator`` is a ``torch.Generator`` or a list with one per image; with a list, each image's noise
comes from its own generator, so the same seed gives the same image at any batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from difflab.denoisers import DenoiserFn
from difflab.devices import to_device
from difflab.errors import DifflabError

Generator = torch.Generator | list[torch.Generator] | None
Callback = Callable[[int, float, torch.Tensor, torch.Tensor], None]  # (step, sigma, x, x0_hat)


def randn_like(x: torch.Tensor, generator: Generator = None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``; one draw per image when ``generator`` is a list. Noise drawn on the
    host for a GPU batch goes there in one copy from pinned memory, which the GPU does not make the host wait for."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
        noise = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=g.device) for g in generator])
    else:
        device = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device)
    return to_device(noise, x.device)


def denoise(denoiser: DenoiserFn, x: torch.Tensor, sigma: torch.Tensor, cond, i: int, callback) -> torch.Tensor:
    """One network evaluation at noise level ``sigma`` (a host number) for the whole batch, reported to ``callback``.
    The batch of sigmas is filled on x's device: copying it there would make the host wait for the GPU."""
    x0 = denoiser(x, torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device), cond).to(x.dtype)
    if callback is not None:
        callback(i, float(sigma), x, x0)
    return x0


def prepare(x: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a sigma grid; return x and the grid in the working precision: float32, or float64 when x is float64
    (exact-answer tests measure convergence orders below float32 rounding). The grid stays in host memory: the
    samplers branch on its values (``if sigma_next > 0``) and scale x by them, and both are free with host numbers
    -- a 0-d host tensor enters a GPU kernel as an argument -- while a grid on the GPU would make every branch wait
    for the device."""
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or len(sigmas) < 2 or not bool((sigmas[:-1] > sigmas[1:]).all()) or sigmas[-1] < 0:
        raise DifflabError("a sigma grid must be 1-D, strictly decreasing and non-negative, with at least 2 entries")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.to(dtype), sigmas.to(device="cpu", dtype=dtype)


# ---------------------------------------------------------------------------------------------------------
# The registry: each sampler module registers its functions with @register, so adding a sampler is one
# function in one module; ``difflab samplers`` lists them in the order :mod:`difflab.samplers` imports them.


@dataclass(frozen=True)
class SamplerInfo:
    fn: Callable[..., torch.Tensor]
    description: str
    nfe: Callable[[int], int] | None  # network evaluations for a grid of N steps with default options (None: adaptive)
    stochastic: bool
    order: int  # convergence order as an ODE solver (0 for samplers that are SDE solvers)


SAMPLERS: dict[str, SamplerInfo] = {}


def register(name: str, description: str, *, nfe: Callable[[int], int] | None, stochastic: bool, order: int):
    """Decorator: make a sampler function known by ``name`` (to `difflab sample --sampler` and :func:`get_sampler`)."""

    def add(fn):
        SAMPLERS[name] = SamplerInfo(fn, description, nfe, stochastic, order)
        return fn

    return add


def one_per_step(n: int) -> int:
    return n


def two_per_step(n: int) -> int:
    return 2 * n - 1  # the last step (to sigma = 0) is a plain Euler step


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """Look a sampler up by name, with a clear error listing the choices."""
    if name not in SAMPLERS:
        raise DifflabError(f"unknown sampler '{name}' (choose from {', '.join(SAMPLERS)}; `difflab samplers` describes them)")
    return SAMPLERS[name].fn
