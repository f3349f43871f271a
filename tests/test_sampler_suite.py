"""The full sampler suite: convergence orders on exact Gaussian answers, stochastic moments, and whole
trajectories against diffusers' schedulers on the same model function and sigma grid."""

import math

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)
from torch import nn

from difflab.denoisers import Denoiser, VPParameterization
from difflab.exact import gaussian_denoiser, gaussian_ode_solution
from difflab.guidance import dynamic_threshold
from difflab.samplers import (
    SAMPLERS,
    get_sampler,
    sample_ddim,
    sample_edm,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
)
from difflab.schedules import karras_sigmas, make_schedule, sampling_sigmas

MEAN, STD = 0.4, 0.3
EXACT = gaussian_denoiser(MEAN, STD)


def ode_error(name, steps, sigma_max=80.0, sigma_min=0.002):
    """Max error at sigma_min against the exact probability-flow solution, in float64."""
    sigmas = karras_sigmas(steps, sigma_min, sigma_max)[:-1]  # stop at sigma_min: no final denoising jump
    g = torch.Generator().manual_seed(0)
    x = MEAN + (STD**2 + sigma_max**2) ** 0.5 * torch.randn(1000, 1, 1, 1, generator=g, dtype=torch.float64)
    out = get_sampler(name)(EXACT, x, sigmas)
    return (out - gaussian_ode_solution(x, sigma_max, sigma_min, MEAN, STD)).abs().max().item()


@pytest.mark.parametrize("name,order", [("euler", 1), ("ddim", 1), ("heun", 2), ("dpmpp_2m", 2), ("dpmpp_3m", 3)])
def test_measured_convergence_order_matches_theory(name, order):
    errors = [ode_error(name, n) for n in (64, 128, 256)]
    measured = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(abs(m - order) < 0.25 for m in measured), (errors, measured)
    assert SAMPLERS[name].order == order


@pytest.mark.parametrize("name,tol", [("euler", 3e-2), ("heun", 2e-3), ("dpmpp_2m", 2e-3), ("dpmpp_3m", 2e-3)])
def test_deterministic_samplers_reach_the_exact_solution_at_zero(name, tol):
    schedule = make_schedule("linear", 1000)
    sigmas = sampling_sigmas(schedule, 200, "karras")
    g = torch.Generator().manual_seed(1)
    x = MEAN + (STD**2 + sigmas[0].item() ** 2) ** 0.5 * torch.randn(500, 1, 1, 1, generator=g, dtype=torch.float64)
    out = get_sampler(name)(EXACT, x, sigmas)
    exact = gaussian_ode_solution(x, sigmas[0].item(), 0.0, MEAN, STD)
    assert (out - exact).abs().max() < tol  # first order needs far more steps for the same error


def test_dpmpp_3m_lowers_its_order_at_the_end_of_short_grids():
    """10 uniform VP steps end with a step onto sigma_min whose h is many times the previous ones: third-order
    extrapolation there amplifies errors (5x 2M's error even with the exact denoiser before lower_order_final)."""
    sigmas = sampling_sigmas(make_schedule("linear", 1000), 10, "uniform")
    g = torch.Generator().manual_seed(1)
    x = MEAN + (STD**2 + sigmas[0].item() ** 2) ** 0.5 * torch.randn(500, 1, 1, 1, generator=g, dtype=torch.float64)
    exact = gaussian_ode_solution(x, sigmas[0].item(), 0.0, MEAN, STD)
    error = {name: (get_sampler(name)(EXACT, x, sigmas) - exact).abs().max().item() for name in ("dpmpp_2m", "dpmpp_3m")}
    assert error["dpmpp_3m"] < 1.5 * error["dpmpp_2m"], error


@pytest.mark.parametrize("name,options", [("euler_ancestral", {}), ("edm", {"churn": 40.0}), ("edm", {"churn": 0.0}),
                                          ("dpmpp_2m_sde", {}), ("dpmpp_2m_sde", {"eta": 0.5})])
def test_stochastic_samplers_reproduce_mean_and_variance(name, options):
    sigmas = karras_sigmas(400, 0.002, 80.0)
    g = torch.Generator().manual_seed(2)
    x = MEAN + (STD**2 + 80.0**2) ** 0.5 * torch.randn(40_000, 1, 1, 1, generator=g)
    out = get_sampler(name)(EXACT, x, sigmas, generator=torch.Generator().manual_seed(3), **options)
    assert out.mean().item() == pytest.approx(MEAN, abs=6e-3)
    assert out.std().item() == pytest.approx(STD, rel=3e-2)


def test_identities_between_samplers():
    sigmas = karras_sigmas(12, 0.01, 50.0)
    x = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0)) * 50

    def den(x, s, c=None):
        return torch.tanh(x) / (1 + s.view(-1, 1, 1, 1))

    torch.testing.assert_close(sample_euler(den, x, sigmas), sample_ddim(den, x, sigmas, eta=0.0))
    a = sample_euler_ancestral(den, x, sigmas, generator=torch.Generator().manual_seed(5))
    b = sample_ddim(den, x, sigmas, eta=1.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(sample_edm(den, x, sigmas, churn=0.0), sample_heun(den, x, sigmas))


def test_karras_grid_matches_diffusers():
    schedule = make_schedule("linear", 1000)
    ref = EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="linear", use_karras_sigmas=True)
    for steps in (5, 25, 100):
        ours = sampling_sigmas(schedule, steps, "karras")
        # the formula, fed the same (float64) end points
        theirs = ref._convert_to_karras(in_sigmas=schedule.sigmas.flip(0).numpy(), num_inference_steps=steps)
        torch.testing.assert_close(ours[:-1], torch.as_tensor(theirs, dtype=torch.float64), rtol=1e-12, atol=0)
        # the stock scheduler, whose float32 cumulative product moves sigma_max by ~4e-5 relative
        ref.set_timesteps(steps)
        torch.testing.assert_close(ours.float(), ref.sigmas, rtol=1e-4, atol=1e-6)


# ---- whole trajectories against diffusers, same model function and same sigma grid


class EpsNet(nn.Module):
    """A fixed nonlinear 'network' of the (scaled) input only, so both libraries see the same model."""

    def forward(self, x_in, t=None, cond=None):
        return 0.8 * torch.tanh(1.5 * x_in) + 0.1 * x_in


def run_diffusers(scheduler, x_start_sigma, steps, generator=None, scale_input=True):
    scheduler.set_timesteps(steps)
    sample = x_start_sigma.clone()
    net = EpsNet()
    extra = {"generator": generator} if generator is not None else {}
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(sample, t) if scale_input else sample
        sample = scheduler.step(net(model_in), t, sample, **extra).prev_sample
    return sample


# diffusers' EulerAncestralDiscreteScheduler has no Karras option (our samplers take any grid)
@pytest.mark.parametrize("kind,karras", [("euler", False), ("euler", True), ("euler_ancestral", False), ("heun", False),
                                         ("heun", True), ("dpmpp_2m", False), ("dpmpp_2m", True)])
@pytest.mark.parametrize("steps", [10, 25])
def test_trajectories_match_diffusers(kind, steps, karras):
    schedule = make_schedule("linear", 1000)
    den = Denoiser(EpsNet(), VPParameterization(schedule, "eps"))
    common = dict(num_train_timesteps=1000, beta_schedule="linear")
    if karras:
        common["use_karras_sigmas"] = True
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(3, 2, 4, 4, generator=g)
    if kind == "dpmpp_2m":
        ref = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **common)
        ref.set_timesteps(steps)
        sigmas = ref.sigmas.double()
        # DPM-Solver works on x_t = x / sqrt(1 + sigma^2); start both from the same x_T
        x_t = noise
        expected = run_diffusers(ref, x_t, steps, scale_input=False)
        got = get_sampler("dpmpp_2m")(den, x_t * (1 + sigmas[0] ** 2).sqrt().float(), sigmas)
    else:
        cls = {"euler": EulerDiscreteScheduler, "euler_ancestral": EulerAncestralDiscreteScheduler,
               "heun": HeunDiscreteScheduler}[kind]
        ref = cls(**common)
        ref.set_timesteps(steps)
        sigmas = torch.unique_consecutive(ref.sigmas).double()  # Heun repeats each sigma for its two stages
        x = noise * sigmas[0].float()
        gen = torch.Generator().manual_seed(7) if kind == "euler_ancestral" else None
        expected = run_diffusers(ref, x, steps, generator=gen)
        got = get_sampler(kind)(den, x, sigmas, generator=torch.Generator().manual_seed(7))
    assert len(sigmas) == steps + 1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# ---- dynamic thresholding (Saharia et al. 2022)


def test_dynamic_threshold_on_known_quantiles():
    # per image: |x0| takes the values 0.01, 0.02, ..., 1.00 times a scale, so the 0.9 quantile is known
    base = torch.linspace(0.01, 1.0, 100)
    x0 = torch.stack([base * 3.0, -base * 0.5]).view(2, 1, 10, 10)  # image 0 saturates, image 1 does not
    wrapped = dynamic_threshold(lambda x, s, c=None: x, percentile=0.9)
    out = wrapped(x0, torch.ones(2))
    s0 = torch.quantile(base * 3.0, 0.9)  # = 3 * 0.901
    assert s0.item() == pytest.approx(3 * 0.901, rel=1e-5)
    torch.testing.assert_close(out[0], x0[0].clamp(-s0, s0) / s0)
    assert out[0].abs().max().item() == pytest.approx(1.0)
    assert (out[0] == 1.0).sum() == 10  # the top 10% saturate at exactly 1
    torch.testing.assert_close(out[1], x0[1])  # s = 0.45 < 1: only clamped to [-1, 1], i.e. unchanged
    # percentile 1 with a mild overshoot: pure rescaling by the max
    out = dynamic_threshold(lambda x, s, c=None: x, percentile=1.0)(x0[:1] / 2, torch.ones(1))
    torch.testing.assert_close(out, x0[:1] / x0[:1].abs().max())


def test_dynamic_threshold_keeps_samples_in_range_with_every_sampler():
    wide = gaussian_denoiser(0.0, 4.0)
    sigmas = karras_sigmas(8, 0.01, 80.0)
    x = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * 80
    for name in SAMPLERS:
        out = get_sampler(name)(dynamic_threshold(wide), x, sigmas, generator=torch.Generator().manual_seed(0))
        assert out.abs().max() <= 1.0 + 1e-5, name
