"""Schedules and the forward process: closed forms, statistics and diffusers' tables."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from difflab.errors import DifflabError
from difflab.schedules import (
    BETA_SCHEDULES,
    add_noise,
    make_schedule,
    q_sample,
    sampling_sigmas,
    sampling_timesteps,
    sigma_to_t,
)

DIFFUSERS_NAMES = {"linear": "linear", "quadratic": "scaled_linear", "cosine": "squaredcos_cap_v2", "sigmoid": "sigmoid"}


@pytest.mark.parametrize("name", list(BETA_SCHEDULES))
def test_betas_and_abar_match_diffusers(name):
    s = make_schedule(name, 1000)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_NAMES[name])
    torch.testing.assert_close(s.betas.float(), ref.betas, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-5, atol=1e-7)
    for t in (1, 10, 500, 999):
        # diffusers forms 1 - abar in float32, which loses ~1e-3 relative near t = 0; ours is float64
        assert s.posterior_variance[t].item() == pytest.approx(ref._get_variance(t).item(), rel=1e-3)


def test_abar_closed_forms():
    T = 1000
    # linear: abar_t = prod_s (1 - beta_s) with beta linear from 1e-4 to 0.02
    s = make_schedule("linear", T)
    betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    assert s.alphas_cumprod[-1].item() == pytest.approx(math.prod(1 - b for b in betas), rel=1e-10)
    # quadratic: sqrt(beta) is linear
    q = make_schedule("quadratic", T).betas.sqrt()
    torch.testing.assert_close(q[1:] - q[:-1], torch.full((T - 1,), (0.02**0.5 - 1e-4**0.5) / (T - 1), dtype=torch.float64))
    # cosine (Nichol & Dhariwal eq. 17): abar_t = f(t) / f(0) wherever beta was not clipped
    c = make_schedule("cosine", T)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (1, 100, 500, 900, 990):
        assert c.alphas_cumprod[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-9)
    assert c.betas.max().item() <= 0.999
    # sigmoid: symmetric around the middle
    b = make_schedule("sigmoid", T).betas
    torch.testing.assert_close(b + b.flip(0), torch.full((T,), 1e-4 + 0.02, dtype=torch.float64))


def test_derived_quantities_are_float64_and_consistent():
    s = make_schedule("linear", 100)
    for field in ("betas", "alphas_cumprod", "posterior_variance", "sigmas"):
        assert getattr(s, field).dtype == torch.float64
    # the posterior mean coefficients reproduce x0 and x_t exactly when x_t is noiseless-consistent:
    # mu~(x_t, x0) with x_t = sqrt(abar_t) x0 gives sqrt(abar_{t-1}) x0
    coef = s.posterior_mean_coef_x0 + s.posterior_mean_coef_xt * s.alphas_cumprod.sqrt()
    torch.testing.assert_close(coef, s.alphas_cumprod_prev.sqrt())
    torch.testing.assert_close(s.sigmas**2, (1 - s.alphas_cumprod) / s.alphas_cumprod)


def test_q_sample_statistics_and_sigma_form():
    s = make_schedule("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1, 1, 1), 0.7)
    for t in (0, 300, 999):
        tt = torch.full((x0.shape[0],), t)
        noise = torch.randn(x0.shape, generator=g)
        xt = q_sample(x0, tt, noise, s)
        abar = s.alphas_cumprod[t].item()
        assert xt.mean().item() == pytest.approx(abar**0.5 * 0.7, abs=5e-3)
        assert xt.var().item() == pytest.approx(1 - abar, rel=1e-2, abs=1e-4)
        # the same draw in sigma coordinates: x = x0 + sigma n = x_t / sqrt(abar)
        x = add_noise(x0, s.sigmas[tt].float(), noise)
        torch.testing.assert_close(xt / abar**0.5, x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spacing,diffusers_spacing", [("uniform", "linspace"), ("leading", "leading"), ("trailing", "trailing")])
@pytest.mark.parametrize("steps", [10, 50, 999])
def test_timestep_spacings_match_diffusers(spacing, diffusers_spacing, steps):
    ref = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=diffusers_spacing)
    ref.set_timesteps(steps)
    assert sampling_timesteps(1000, steps, spacing).tolist() == ref.timesteps.tolist()


def test_sampling_sigmas_and_sigma_to_t():
    s = make_schedule("linear", 1000)
    full = sampling_sigmas(s, 1000)
    assert len(full) == 1001 and full[-1] == 0 and bool((full[:-1] > full[1:]).all())
    torch.testing.assert_close(full[:-1], s.sigmas.flip(0))
    t = sigma_to_t(s.sigmas, s)
    torch.testing.assert_close(t, torch.arange(1000, dtype=torch.float64), atol=1e-9, rtol=0)
    mid = (s.sigmas[10] * s.sigmas[11]).sqrt()  # geometric midpoint -> halfway in log-sigma
    assert sigma_to_t(mid.reshape(1), s).item() == pytest.approx(10.5, abs=1e-9)


def test_bad_schedule_arguments():
    with pytest.raises(DifflabError, match="unknown noise schedule"):
        make_schedule("exponential")
    with pytest.raises(DifflabError, match="between 1 and T"):
        sampling_timesteps(100, 0)
    with pytest.raises(DifflabError, match="spacing"):
        sampling_timesteps(100, 10, "random")


@pytest.mark.parametrize("spacing", ["uniform", "trailing", "leading"])
def test_every_step_count_gives_a_valid_subsequence(spacing):
    # (diffusers' float arange for "trailing" yields an extra timestep at 61, 103, ... steps; ours does not)
    for steps in range(1, 1001):
        ts = sampling_timesteps(1000, steps, spacing)
        assert len(ts) == steps and ts.min() >= 0 and ts.max() <= 999
        assert bool((ts[:-1] > ts[1:]).all()), (spacing, steps)
        if spacing == "trailing":
            assert ts[0] == 999
