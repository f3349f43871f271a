"""Distillation against exact answers: Gaussian data x0 ~ N(MEAN, STD^2) has a closed-form denoiser (the ideal
teacher) and a closed-form probability-flow ODE, hence a closed-form consistency function."""

import math

import pytest
import torch

from difflab.denoisers import ConsistencyParameterization, Denoiser, EDMParameterization, VPParameterization
from difflab.distillation import (
    consistency_grid,
    consistency_loss,
    ddim_step,
    progressive_loss,
    progressive_target,
    pseudo_huber,
    teacher_step,
    truncated_snr_weight,
)
from difflab.exact import gaussian_denoiser, gaussian_ode_solution
from difflab.nn import UNet, unet_config
from difflab.samplers import sample_consistency, sample_ddim, sample_heun
from difflab.schedules import make_schedule
from difflab.tensors import append_dims

MEAN, STD = 0.4, 0.3
TEACHER = gaussian_denoiser(MEAN, STD)
VP = VPParameterization(make_schedule("linear", 1000), "eps")
EDM = EDMParameterization(0.5)


def _x(sigma: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Noisy Gaussian data at per-example sigma (N,), float64 (N, 1, 2, 2)."""
    g = torch.Generator().manual_seed(seed)
    x0 = MEAN + STD * torch.randn(len(sigma), 1, 2, 2, generator=g, dtype=torch.float64)
    return x0 + append_dims(sigma, 4) * torch.randn(x0.shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("param", [VP, EDM], ids=["vp", "edm"])
def test_trailing_grids_nest_so_each_student_step_is_two_teacher_steps(param):
    for steps in (1, 2, 4, 8, 16):
        fine, coarse = param.sampling_sigmas(2 * steps, "trailing"), param.sampling_sigmas(steps, "trailing")
        torch.testing.assert_close(fine[::2], coarse, rtol=0, atol=0)
        torch.testing.assert_close(param.sampling_sigmas(64, "trailing")[:: 64 // steps], coarse, rtol=0, atol=0)
        assert coarse[0] == pytest.approx(param.sigma_max, rel=1e-9) and coarse[-1] == 0


@pytest.mark.parametrize("param", [VP, EDM], ids=["vp", "edm"])
def test_progressive_target_makes_one_ddim_step_land_on_the_teachers_two(param):
    fine = param.sampling_sigmas(16, "trailing")  # the teacher's 16 steps; the student's 8 are every other point
    i = torch.arange(8) * 2  # every student interval, the last one down to sigma = 0 included
    sigmas = [fine[i], fine[i + 1], fine[i + 2]]
    x = _x(sigmas[0])
    x_tilde = progressive_target(TEACHER, x, sigmas)
    for n in range(8):  # the teacher's two DDIM steps, by the sampler itself, one example at a time
        two_steps = _two_ddim_steps(x[n:n + 1], torch.stack([s[n] for s in sigmas]))
        one_step = ddim_step(x[n:n + 1], x_tilde[n:n + 1], sigmas[0][n:n + 1], sigmas[2][n:n + 1])
        torch.testing.assert_close(one_step, two_steps, rtol=1e-12, atol=1e-12)
    # a student that outputs x~ has zero loss; the teacher itself (one step where two are needed) does not
    student = lambda x_, s, c=None: progressive_target(TEACHER, x_, sigmas)  # noqa: E731
    x0 = MEAN + STD * torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert progressive_loss(student, TEACHER, x0, noise, sigmas).abs().max() == 0
    assert progressive_loss(TEACHER, TEACHER, x0, noise, sigmas)[:-1].min() > 0


def _two_ddim_steps(x, grid):
    """Two DDIM steps grid[0] -> grid[1] -> grid[2] > 0 written as DDIM eq. 12 in sigma coordinates."""
    for sigma, sigma_next in zip(grid[:-1], grid[1:]):
        x0 = TEACHER(x, sigma)
        x = x0 + sigma_next * (x - x0) / sigma  # x0_hat + sigma' eps_hat
    return x


def test_a_one_to_one_stage_targets_the_teachers_own_estimate():
    """The eps -> v conversion stage (ratio 1): x~ is the teacher's x0 estimate itself."""
    sigma, sigma_next = torch.tensor([3.0, 0.5], dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64)
    x = _x(sigma)
    torch.testing.assert_close(progressive_target(TEACHER, x, [sigma, sigma_next]), TEACHER(x, sigma), rtol=1e-12,
                               atol=1e-12)


def test_truncated_snr_weight():
    sigma = torch.tensor([0.01, 0.5, 1.0, 2.0, 100.0])
    torch.testing.assert_close(truncated_snr_weight(sigma), torch.tensor([1e4, 4.0, 1.0, 1.0, 1.0]))


@pytest.mark.parametrize("base", [VP, VPParameterization(make_schedule("cosine", 1000), "v"), EDM],
                         ids=["vp-eps", "vp-v", "edm"])
def test_consistency_function_meets_its_boundary_condition_exactly(base):
    param = ConsistencyParameterization(base, 0.5)
    net = UNet(unet_config("tiny", image_size=8, in_channels=1))
    with torch.no_grad():
        for p in net.parameters():  # a network whose output is far from zero everywhere
            p.add_(0.05 * torch.randn_like(p))
    f = Denoiser(net, param)
    x = torch.randn(4, 1, 8, 8) * 3
    with torch.no_grad():
        at_min = f(x, torch.full((4,), param.sigma_min))
        above = f(x, torch.full((4,), param.sigma_min * 4))
    assert torch.equal(at_min, x)  # f(x, sigma_min) = x, bit for bit
    assert not torch.allclose(above, x)


def test_consistency_scalings_are_song_et_al_on_an_edm_base():
    sd, sigma = 0.5, torch.tensor([0.002, 0.1, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in = ConsistencyParameterization(EDM, sd).scalings(sigma)
    shifted = sigma - EDM.sigma_min
    torch.testing.assert_close(c_skip, sd**2 / (shifted**2 + sd**2))  # Song et al. 2023, Appendix C
    torch.testing.assert_close(c_out, shifted * sd / (sigma**2 + sd**2).sqrt())
    torch.testing.assert_close(c_in, EDM.scalings(sigma)[2])


def _exact_step(x, sigma, sigma_next, cond=None):
    """The exact probability-flow ODE step for the Gaussian data (per-example sigmas)."""
    s, s_next = append_dims(sigma, x.ndim), append_dims(sigma_next, x.ndim)
    return MEAN + (x - MEAN) * ((STD**2 + s_next**2) / (STD**2 + s**2)).sqrt()


def _ideal_consistency(sigma_min):
    """f*(x, sigma): the ODE solution from sigma to sigma_min (the true consistency function)."""
    def f(x, sigma, cond=None):
        return _exact_step(x, sigma, torch.full_like(sigma, sigma_min))
    return f


def test_the_ideal_consistency_function_has_zero_loss_on_every_interval_with_the_exact_teacher():
    grid = consistency_grid(18, 0.002, 80.0).double()
    assert grid[0] == 80.0 and grid[-1] == 0.002 and bool((grid[:-1] > grid[1:]).all())
    f = _ideal_consistency(0.002)
    x0 = MEAN + STD * torch.randn(17, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    k = torch.arange(17)  # every interval of the grid
    loss = consistency_loss(f, f, _exact_step, x0, noise, grid[k], grid[k + 1], c=1e-3)
    assert loss.abs().max() < 1e-9  # zero, up to the float32 rounding of the distance
    # the boundary in the ideal function: f*(x, sigma_min) = x
    torch.testing.assert_close(f(x0, torch.full((17,), 0.002, dtype=torch.float64)), x0)
    # a real teacher step is not exact: the loss is positive, smaller for Heun than for DDIM, and shrinks with N
    losses = {}
    for solver in ("ddim", "heun"):
        for n in (10, 40):
            g = consistency_grid(n, 0.002, 80.0).double()
            kk = torch.arange(n - 1)
            x0n, nn_ = x0.repeat(3, 1, 1, 1)[: n - 1], noise.repeat(3, 1, 1, 1)[: n - 1]
            losses[solver, n] = float(consistency_loss(f, f, teacher_step(TEACHER, solver), x0n, nn_, g[kk],
                                                       g[kk + 1], c=1e-3).mean())
    assert 0 < losses["heun", 10] < losses["ddim", 10], losses
    assert losses["ddim", 40] < losses["ddim", 10] and losses["heun", 40] < losses["heun", 10], losses


def test_teacher_steps_are_the_samplers_steps():
    sigma, sigma_next = torch.tensor([5.0], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)
    x = _x(sigma)
    for solver, sampler in (("ddim", sample_ddim), ("heun", sample_heun)):
        # the sampler's x at the start of its second step is the result of its first (5 -> 2)
        steps = []
        sampler(TEACHER, x, torch.tensor([5.0, 2.0, 1.0, 0.0], dtype=torch.float64),
                callback=lambda i, s, x_, x0: steps.append((i, x_.clone())))
        after_first = next(x_ for i, x_ in steps if i == 1)
        torch.testing.assert_close(teacher_step(TEACHER, solver)(x, sigma, sigma_next), after_first, rtol=1e-12,
                                   atol=1e-12)
    # on a small step Heun is second order: far closer to the exact ODE solution than Euler
    sigma, sigma_next = torch.tensor([0.5], dtype=torch.float64), torch.tensor([0.45], dtype=torch.float64)
    x = _x(sigma)
    exact = gaussian_ode_solution(x, 0.5, 0.45, MEAN, STD)
    heun, ddim = (teacher_step(TEACHER, s)(x, sigma, sigma_next) for s in ("heun", "ddim"))
    assert (heun - exact).abs().max() < (ddim - exact).abs().max() / 5


def test_pseudo_huber_is_l2_for_small_and_l1_for_large_errors():
    a, zero = torch.zeros(1, 100), torch.zeros(1, 100)
    c = 0.00054 * math.sqrt(100)
    assert float(pseudo_huber(a, zero)) == 0
    small = torch.full((1, 100), 1e-5)
    assert float(pseudo_huber(small, zero)) == pytest.approx(100 * 1e-10 / (2 * c), rel=1e-2)  # |d|^2 / 2c
    large = torch.full((1, 100), 1.0)
    assert float(pseudo_huber(large, zero)) == pytest.approx(10.0 - c, rel=1e-4)  # |d| - c


def test_the_consistency_sampler_with_the_ideal_function_samples_the_data():
    """One step of f* from sigma_max gives x0 ~ N(MEAN, STD^2 + sigma_min^2); two steps as well (re-noised)."""
    f = _ideal_consistency(0.002)
    g = torch.Generator().manual_seed(3)
    x = MEAN + (STD**2 + 80.0**2) ** 0.5 * torch.randn(40_000, 1, 1, 1, generator=g, dtype=torch.float64)
    for sigmas in ([80.0, 0.0], [80.0, 0.8, 0.0]):
        out = sample_consistency(f, x, torch.tensor(sigmas, dtype=torch.float64), generator=g)
        assert out.mean().item() == pytest.approx(MEAN, abs=6e-3)
        assert out.std().item() == pytest.approx(STD, rel=2e-2)
