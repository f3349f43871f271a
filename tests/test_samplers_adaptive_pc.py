"""The adaptive-step ODE solver and predictor–corrector sampling against exact answers for Gaussian data."""

import math

import pytest
import torch

from difflab.errors import DifflabError
from difflab.exact import gaussian_denoiser, gaussian_ode_solution
from difflab.generate import CountingDenoiser
from difflab.samplers import get_sampler
from difflab.samplers.adaptive import sample_adaptive
from difflab.samplers.ode import sample_euler, sample_heun
from difflab.samplers.pc import langevin_correct, sample_pc
from difflab.schedules import make_schedule, sampling_sigmas

MEAN, STD = 0.4, 0.3
SCHEDULE = make_schedule("linear", 1000)
DENOISER = gaussian_denoiser(MEAN, STD)


def vp_grid(steps):
    return sampling_sigmas(SCHEDULE, min(steps, SCHEDULE.T))  # from sigma_max ~ 157 to sigma_min ~ 0.01, then 0


def geometric_grid(steps, sigma_max=80.0, sigma_min=0.002):
    sigmas = torch.logspace(math.log10(sigma_max), math.log10(sigma_min), steps, dtype=torch.float64)
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def start_noise(shape, sigma_max, seed=0):
    """x at sigma_max drawn from the exact marginal N(mean, std^2 + sigma_max^2)."""
    g = torch.Generator().manual_seed(seed)
    return MEAN + (STD**2 + sigma_max**2) ** 0.5 * torch.randn(shape, generator=g)


def exact(x, sigmas):
    """The exact PF-ODE solution from sigmas[0] to sigma_min, then the final step D(x, sigma_min): the limit of
    every sampler here as its steps shrink (the last step of a grid ending in 0 is a denoise)."""
    sigma_max, sigma_min = sigmas[0].item(), sigmas[-2].item()
    x_min = gaussian_ode_solution(x.double(), sigma_max, sigma_min, MEAN, STD)
    return DENOISER(x_min, torch.tensor(sigma_min, dtype=torch.float64)).float()


def nonlinear_denoiser(x, sigma, cond=None):
    return torch.tanh(x) * (1 / (1 + sigma.view(-1, 1, 1, 1)))


def max_error(out, ref):
    return (out - ref).abs().max().item()


# ---------------------------------------------------------------------------------------------------
# sample_adaptive


@pytest.mark.parametrize("grid", [vp_grid(10), geometric_grid(20)], ids=["vp", "geometric"])
def test_adaptive_meets_its_tolerance_against_the_exact_solution(grid):
    x = start_noise((256, 1, 4, 4), grid[0].item())
    ref = exact(x, grid)
    errors, nfes = [], []
    for rtol in (1e-1, 1e-2, 1e-3):
        stats = {}
        counter = CountingDenoiser(DENOISER)
        errors.append(max_error(sample_adaptive(counter, x, grid, rtol=rtol, atol=rtol / 10, max_nfe=1000, stats=stats), ref))
        nfes.append(counter.nfe)
        assert stats["nfe"] == counter.nfe and stats["accepted"] >= 1
        assert errors[-1] < 2 * rtol, (rtol, errors)  # samples lie in ~[-0.7, 1.5]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 2e-3, errors
    assert nfes[0] < nfes[1] < nfes[2] < 200, nfes


def test_adaptive_needs_fewer_evaluations_than_euler_at_the_same_accuracy():
    grid = vp_grid(10)  # the adaptive solver uses only its end points
    x = start_noise((256, 1, 4, 4), grid[0].item())
    ref = exact(x, grid)
    counter = CountingDenoiser(DENOISER)
    error = max_error(sample_adaptive(counter, x, grid), ref)  # default rtol = 0.05, atol = 0.0078
    steps = 8
    while max_error(sample_euler(DENOISER, x, vp_grid(steps)), ref) > error:  # one evaluation per Euler step
        steps *= 2
        assert steps <= 1024, "Euler never reached the adaptive solver's accuracy"
    assert 3 * counter.nfe < steps, (counter.nfe, steps, error)  # measured: 29 vs 256 at error 0.03


@pytest.mark.parametrize("max_nfe", [2, 3, 5, 10, 20])
def test_adaptive_never_exceeds_max_nfe_and_stays_finite(max_nfe):
    grid = geometric_grid(20)
    x = start_noise((64, 1, 4, 4), grid[0].item())
    counter = CountingDenoiser(DENOISER)
    out = sample_adaptive(counter, x, grid, rtol=1e-4, atol=1e-5, max_nfe=max_nfe)
    assert counter.nfe <= max_nfe
    assert counter.nfe >= max_nfe - 1  # a tight tolerance spends the budget (an even one leaves 1 unused)
    assert torch.isfinite(out).all()
    assert max_error(out, exact(x, grid)) < {2: 2.0, 3: 1.0, 5: 1.0, 10: 0.5, 20: 0.15}[max_nfe]


def test_adaptive_without_final_zero_stops_at_sigma_min():
    grid = geometric_grid(20)[:-1]  # ends at 0.002, not 0: no final denoise
    x = start_noise((64, 1, 4, 4), grid[0].item())
    seen = []
    out = sample_adaptive(DENOISER, x, grid, rtol=1e-3, atol=1e-4, callback=lambda i, s, x_, x0: seen.append(s))
    ref = gaussian_ode_solution(x.double(), grid[0].item(), grid[-1].item(), MEAN, STD).float()
    assert max_error(out, ref) < 2e-3
    assert seen[0] == pytest.approx(80.0) and min(seen) > 0.002 * 0.999


def test_adaptive_with_a_nonlinear_denoiser_is_finite_deterministic_and_converges():
    grid = geometric_grid(20)
    x = 80 * torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    fine = sample_heun(nonlinear_denoiser, x, geometric_grid(1000))  # same end points, second order
    out = sample_adaptive(nonlinear_denoiser, x, grid, rtol=1e-3, atol=1e-4)
    assert torch.isfinite(out).all()
    assert torch.equal(out, sample_adaptive(nonlinear_denoiser, x, grid, rtol=1e-3, atol=1e-4))
    assert max_error(out, fine) < 2e-3


def test_adaptive_refuses_bad_arguments():
    x, grid = torch.zeros(1, 1, 2, 2), geometric_grid(5)
    for options, match in [({"rtol": 0.0}, "rtol"), ({"atol": -1.0}, "atol"), ({"rtol": math.nan}, "rtol"),
                           ({"max_nfe": 1}, "max_nfe"), ({"max_nfe": 2.5}, "max_nfe"), ({"safety": 0.0}, "safety"),
                           ({"h_init": 0.0}, "h_init")]:
        with pytest.raises(DifflabError, match=match):
            sample_adaptive(DENOISER, x, grid, **options)
    with pytest.raises(DifflabError, match="strictly decreasing"):
        sample_adaptive(DENOISER, x, grid.flip(0))


# ---------------------------------------------------------------------------------------------------
# sample_pc and the Langevin corrector


@pytest.mark.parametrize("predictor,options", [("euler", None), ("heun", None), ("ddpm", None), ("edm", {"churn": 10.0}),
                                               (get_sampler("ddim"), {"eta": 0.5})])
def test_pc_without_corrector_is_exactly_the_predictor(predictor, options):
    grid = vp_grid(12)
    x = start_noise((16, 1, 4, 4), grid[0].item())
    fn = get_sampler(predictor) if isinstance(predictor, str) else predictor
    a = sample_pc(DENOISER, x, grid, predictor=predictor, corrector_steps=0, predictor_options=options,
                  generator=torch.Generator().manual_seed(7))
    b = fn(DENOISER, x, grid, generator=torch.Generator().manual_seed(7), **(options or {}))
    assert torch.equal(a, b)


@pytest.mark.parametrize("predictor", ["euler", "ddpm"])
def test_pc_on_a_coarse_grid_reproduces_mean_and_std(predictor):
    grid = geometric_grid(20)
    x = start_noise((128, 1, 16, 16), grid[0].item())
    run = lambda m: sample_pc(DENOISER, x, grid, predictor=predictor, corrector_steps=m,  # noqa: E731
                              generator=torch.Generator().manual_seed(1))
    alone, corrected = run(0), run(3)
    assert abs(alone.std().item() / STD - 1) > 0.1  # 20 steps alone: std 13% (euler) / 22% (ddpm) too small
    assert corrected.mean().item() == pytest.approx(MEAN, abs=0.01)
    assert corrected.std().item() == pytest.approx(STD, rel=0.03)


@pytest.mark.parametrize("sigma", [0.1, 1.0, 20.0])
def test_langevin_keeps_the_exact_marginal_and_pulls_a_wrong_one_toward_it(sigma):
    marginal_std = (STD**2 + sigma**2) ** 0.5
    g = torch.Generator().manual_seed(2)
    x = MEAN + marginal_std * torch.randn(128, 1, 16, 16, generator=g)
    out = langevin_correct(DENOISER, x, torch.tensor(sigma), generator=g, steps=50)
    assert (out.mean().item() - MEAN) / marginal_std == pytest.approx(0, abs=0.01)
    # unadjusted Langevin is biased by its step: variance * 1 / (1 - snr^2) at snr = 0.16, ~ +1.3% in std
    assert out.std().item() / marginal_std == pytest.approx(1.0, abs=0.03)
    wide = MEAN + 2 * marginal_std * torch.randn(128, 1, 16, 16, generator=g)
    pulled = langevin_correct(DENOISER, wide, torch.tensor(sigma), generator=g, steps=50)
    assert pulled.std().item() / marginal_std - 1 < 0.25 * (wide.std().item() / marginal_std - 1)


def test_pc_counts_evaluations_reports_each_step_and_keeps_seeds_per_image():
    grid = vp_grid(6)
    counter, seen = CountingDenoiser(DENOISER), []
    gens = lambda n: [torch.Generator().manual_seed(40 + i) for i in range(n)]  # noqa: E731
    x = start_noise((5, 1, 4, 4), grid[0].item())
    big = sample_pc(counter, x, grid, predictor="ddpm", corrector_steps=2, generator=gens(5),
                    callback=lambda i, s, x_, x0: seen.append(i))
    assert counter.nfe == 6 + 2 * 5  # one per predictor step, two corrector steps after each but the last
    assert seen == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5]
    small = sample_pc(DENOISER, x[:2], grid, predictor="ddpm", corrector_steps=2, generator=gens(2))
    torch.testing.assert_close(big[:2], small)


def test_pc_refuses_bad_arguments():
    x, grid = torch.zeros(1, 1, 2, 2), vp_grid(4)
    for options, match in [({"corrector_steps": -1}, "corrector_steps"), ({"corrector_steps": 1.5}, "corrector_steps"),
                           ({"snr": 0.0}, "snr"), ({"predictor": "magic"}, "unknown sampler"),
                           ({"predictor": 42}, "predictor"), ({"predictor_options": "eta=1"}, "predictor_options")]:
        with pytest.raises(DifflabError, match=match):
            sample_pc(DENOISER, x, grid, **options)
