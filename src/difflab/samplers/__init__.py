"""Samplers: plain functions ``sample_xxx(denoiser, x, sigmas, *, cond, generator, callback, **options)``.

See :mod:`difflab.samplers.common` for the shared conventions. Each module registers its samplers
(``@register``); ``SAMPLERS`` maps each name to its function and a one-line description (what
``difflab samplers`` prints), in the order below.
"""

from __future__ import annotations

from difflab.samplers.adaptive import sample_adaptive
from difflab.samplers.common import SAMPLERS, SamplerInfo, get_sampler, randn_like
from difflab.samplers.consistency import sample_consistency
from difflab.samplers.ddpm import sample_ddim, sample_ddpm
from difflab.samplers.ode import sample_dpmpp_2m, sample_dpmpp_3m, sample_euler, sample_heun
from difflab.samplers.pc import sample_pc
from difflab.samplers.stochastic import sample_dpmpp_2m_sde, sample_edm, sample_euler_ancestral

__all__ = ["SAMPLERS", "SamplerInfo", "get_sampler", "randn_like", "sample_ddim", "sample_ddpm", "sample_dpmpp_2m",
           "sample_dpmpp_2m_sde", "sample_dpmpp_3m", "sample_edm", "sample_euler", "sample_euler_ancestral",
           "sample_heun", "sample_adaptive", "sample_pc", "sample_consistency"]
