"""Samplers against exact answers: Gaussian data N(mean, std^2) has a closed-form denoiser and ODE path."""

import pytest
import torch

from difflab.errors import DifflabError
from difflab.exact import gaussian_denoiser, gaussian_ode_solution
from difflab.guidance import clip_x0
from difflab.samplers import get_sampler, randn_like, sample_ddim, sample_ddpm
from difflab.schedules import make_schedule, sampling_sigmas

MEAN, STD = 0.4, 0.3
SCHEDULE = make_schedule("linear", 1000)


def start_noise(n, sigma_max, seed=0):
    """x at sigma_max drawn from the exact marginal N(mean, std^2 + sigma_max^2)."""
    g = torch.Generator().manual_seed(seed)
    return MEAN + (STD**2 + sigma_max**2) ** 0.5 * torch.randn(n, 1, 1, 1, generator=g)


def ddim_error(steps, spacing="uniform"):
    sigmas = sampling_sigmas(SCHEDULE, steps, spacing)
    x = start_noise(512, sigmas[0].item())
    out = sample_ddim(gaussian_denoiser(MEAN, STD), x, sigmas)
    exact = gaussian_ode_solution(x, sigmas[0].item(), 0.0, MEAN, STD)
    return (out - exact).abs().max().item()


def test_ddim_eta0_converges_to_the_exact_probability_flow_solution():
    errors = [ddim_error(s) for s in (10, 20, 40, 80, 160)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.05, errors  # samples spread over ~[-0.5, 1.3]; the start over ~[-470, 470]
    # DDIM is Euler's method on the ODE: first order, so doubling the steps should roughly halve the error
    ratios = [a / b for a, b in zip(errors[2:], errors[3:])]
    assert all(1.5 < r < 3.0 for r in ratios), ratios
    assert ddim_error(1000) < 1e-2


@pytest.mark.parametrize("sampler,options", [("ddpm", {"variance": "posterior"}), ("ddpm", {"variance": "beta"}),
                                             ("ddim", {"eta": 1.0}), ("ddim", {"eta": 0.5}), ("ddim", {"eta": 0.0})])
def test_stochastic_and_deterministic_samplers_reproduce_mean_and_variance(sampler, options):
    # ancestral sampling is exact only in the limit of small steps, so use the full chain
    sigmas = sampling_sigmas(SCHEDULE, 1000)
    x = start_noise(40_000, sigmas[0].item())
    out = get_sampler(sampler)(gaussian_denoiser(MEAN, STD), x, sigmas, generator=torch.Generator().manual_seed(1), **options)
    assert out.mean().item() == pytest.approx(MEAN, abs=6e-3)
    assert out.std().item() == pytest.approx(STD, rel=2.5e-2)


def test_ddpm_posterior_equals_ddim_eta1():
    sigmas = sampling_sigmas(SCHEDULE, 50)
    x = start_noise(64, sigmas[0].item())
    den = gaussian_denoiser(MEAN, STD)
    a = sample_ddpm(den, x, sigmas, generator=torch.Generator().manual_seed(3))
    b = sample_ddim(den, x, sigmas, eta=1.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def nonlinear_denoiser(x, sigma, cond=None):
    return torch.tanh(x) * (1 / (1 + sigma.view(-1, 1, 1, 1)))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_same_seed_same_image_at_any_batch_size(sampler):
    sigmas = sampling_sigmas(SCHEDULE, 20)

    def run(n):
        gens = [torch.Generator().manual_seed(100 + i) for i in range(n)]
        x = torch.stack([torch.randn(1, 4, 4, generator=g) for g in gens]) * sigmas[0].float()
        return get_sampler(sampler)(nonlinear_denoiser, x, sigmas, generator=gens, **({"eta": 0.7} if sampler == "ddim" else {}))

    big, small = run(5), run(2)
    torch.testing.assert_close(big[:2], small)
    assert not torch.equal(big[0], big[1])
    torch.testing.assert_close(run(5), big)  # deterministic


def test_randn_like_with_generator_list_matches_individual_draws():
    x = torch.zeros(3, 2, 2)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    out = randn_like(x, gens)
    for i in range(3):
        torch.testing.assert_close(out[i], torch.randn(2, 2, generator=torch.Generator().manual_seed(i)))


def test_clip_x0_keeps_samples_in_range():
    sigmas = sampling_sigmas(SCHEDULE, 10)
    x = start_noise(256, sigmas[0].item()) * 3
    wild = gaussian_denoiser(0.0, 5.0)  # data far wider than [-1, 1]
    out = sample_ddim(clip_x0(wild), x, sigmas)
    assert out.min() >= -1 and out.max() <= 1
    assert sample_ddim(wild, x, sigmas).abs().max() > 1


def test_callback_sees_every_step_and_bad_arguments_are_refused():
    sigmas = sampling_sigmas(SCHEDULE, 7)
    seen = []
    sample_ddim(gaussian_denoiser(MEAN, STD), start_noise(4, sigmas[0].item()), sigmas, callback=lambda i, s, x, x0: seen.append((i, s)))
    assert [i for i, _ in seen] == list(range(7))
    with pytest.raises(DifflabError, match="eta"):
        sample_ddim(nonlinear_denoiser, torch.zeros(1, 1, 2, 2), sigmas, eta=1.5)
    with pytest.raises(DifflabError, match="strictly decreasing"):
        sample_ddim(nonlinear_denoiser, torch.zeros(1, 1, 2, 2), sigmas.flip(0))
    with pytest.raises(DifflabError, match="unknown sampler"):
        get_sampler("magic")
    with pytest.raises(DifflabError, match="variance"):
        sample_ddpm(nonlinear_denoiser, torch.zeros(1, 1, 2, 2), sigmas, variance="huge")
