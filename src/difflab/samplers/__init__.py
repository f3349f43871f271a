"""Samplers: plain functions ``sample_xxx(denoiser, x, sigmas, *, cond, generator, callback, **options)``.

See :mod:`difflab.samplers.common` for the shared conventions. ``SAMPLERS`` maps each name to its function
and a one-line description (what ``difflab samplers`` prints).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from difflab.errors import DifflabError
from difflab.samplers.common import randn_like
from difflab.samplers.ddpm import sample_ddim, sample_ddpm
from difflab.samplers.ode import sample_dpmpp_2m, sample_dpmpp_3m, sample_euler, sample_heun
from difflab.samplers.adaptive import sample_adaptive
from difflab.samplers.pc import sample_pc
from difflab.samplers.stochastic import sample_dpmpp_2m_sde, sample_edm, sample_euler_ancestral


@dataclass(frozen=True)
class SamplerInfo:
    fn: Callable[..., torch.Tensor]
    description: str
    nfe: Callable[[int], int] | None  # network evaluations for a grid of N steps with default options (None: adaptive)
    stochastic: bool
    order: int  # convergence order as an ODE solver (0 for samplers that are SDE solvers)


SAMPLERS: dict[str, SamplerInfo] = {
    "ddpm": SamplerInfo(sample_ddpm, "DDPM ancestral sampling (Ho et al. 2020, Alg. 2); variance=posterior|beta", lambda n: n, True, 0),
    "ddim": SamplerInfo(sample_ddim, "DDIM (Song et al. 2021); eta=0 deterministic ... eta=1 ancestral", lambda n: n, False, 1),
    "euler": SamplerInfo(sample_euler, "Euler on the probability-flow ODE (= DDIM, eta=0)", lambda n: n, False, 1),
    "heun": SamplerInfo(sample_heun, "Heun's 2nd-order method (Karras et al. 2022, Alg. 1); 2 NFE per step", lambda n: 2 * n - 1, False, 2),
    "euler_ancestral": SamplerInfo(sample_euler_ancestral, "Euler-ancestral (k-diffusion; = DDIM with eta=1)", lambda n: n, True, 0),
    "edm": SamplerInfo(sample_edm, "stochastic EDM sampler with churn (Karras et al. 2022, Alg. 2)", lambda n: 2 * n - 1, True, 0),
    "dpmpp_2m": SamplerInfo(sample_dpmpp_2m, "DPM-Solver++(2M), 2nd-order multistep (Lu et al. 2022)", lambda n: n, False, 2),
    "dpmpp_3m": SamplerInfo(sample_dpmpp_3m, "DPM-Solver++(3M), 3rd-order multistep (Lu et al. 2022)", lambda n: n, False, 3),
    "dpmpp_2m_sde": SamplerInfo(sample_dpmpp_2m_sde, "DPM-Solver++(2M) SDE variant; eta=1 solves the reverse SDE", lambda n: n, True, 0),
    "adaptive": SamplerInfo(sample_adaptive, "adaptive-step DPM-Solver-12 with error control (Lu et al. 2022, Alg. 4); "
                            "--tol instead of --steps, never more than --max-nfe evaluations", None, False, 2),
    "pc": SamplerInfo(sample_pc, "predictor-corrector: any predictor + Langevin corrector steps (Song et al. 2021, Alg. 4/5)",
                      lambda n: 2 * n - 1, True, 0),
}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """Look a sampler up by name, with a clear error listing the choices."""
    if name not in SAMPLERS:
        raise DifflabError(f"unknown sampler '{name}' (choose from {', '.join(SAMPLERS)}; `difflab samplers` describes them)")
    return SAMPLERS[name].fn


__all__ = ["SAMPLERS", "SamplerInfo", "get_sampler", "randn_like", "sample_ddim", "sample_ddpm", "sample_dpmpp_2m",
           "sample_dpmpp_2m_sde", "sample_dpmpp_3m", "sample_edm", "sample_euler", "sample_euler_ancestral",
           "sample_heun", "sample_adaptive", "sample_pc"]
