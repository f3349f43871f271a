"""Parameterizations as objects: EDM's preconditioning checked against the exact answers of Gaussian data, the
VP family's bookkeeping, and their JSON round trips."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from difflab.denoisers import Denoiser, EDMParameterization, VPParameterization, parameterization_from_config
from difflab.errors import DifflabError
from difflab.exact import gaussian_denoiser
from difflab.losses import denoising_loss
from difflab.schedules import karras_sigmas, make_schedule

SIGMAS = torch.tensor([0.002, 0.05, 0.3, 1.0, 4.0, 80.0])


class Zero(nn.Module):
    def forward(self, x, c_noise, cond=None):
        return torch.zeros_like(x)


def test_edm_scalings_are_table_1():
    p, s = EDMParameterization(0.7), SIGMAS
    c_skip, c_out, c_in = p.scalings(s)
    torch.testing.assert_close(c_skip, 0.49 / (s**2 + 0.49))
    torch.testing.assert_close(c_out, s * 0.7 / (s**2 + 0.49).sqrt())
    torch.testing.assert_close(c_in, 1 / (s**2 + 0.49).sqrt())
    torch.testing.assert_close(p.c_noise(s), s.log() / 4)
    torch.testing.assert_close(p.loss_weight(s), (s**2 + 0.49) / (s * 0.7) ** 2)
    # the weight makes the effective weight of the network-output error exactly 1: lambda c_out^2 = 1
    torch.testing.assert_close(p.loss_weight(s) * c_out**2, torch.ones_like(s))


def test_edm_skip_connection_is_the_exact_denoiser_of_gaussian_data():
    """For x0 ~ N(0, s^2) and sigma_data = s, D*(x, sigma) = s^2 / (s^2 + sigma^2) x = c_skip x: the optimal network
    output is exactly 0 at every noise level (the skip connection carries the whole answer)."""
    s = 0.6
    x = torch.randn(len(SIGMAS), 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 5
    edm = Denoiser(Zero(), EDMParameterization(s))
    torch.testing.assert_close(edm(x.float(), SIGMAS).double(), gaussian_denoiser(0.0, s)(x, SIGMAS.double()),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mean", [0.0, 0.4])
def test_edm_loss_of_the_exact_denoiser_is_one_at_every_sigma(mean):
    """lambda(sigma) times the posterior variance s^2 sigma^2 / (s^2 + sigma^2) is 1 when sigma_data = s: EDM's
    unit-variance training target, measured by Monte Carlo through the one loss."""
    s, n = 0.5, 200_000
    g = torch.Generator().manual_seed(1)
    p = EDMParameterization(s)
    for sigma in (0.01, 0.3, 1.0, 10.0):
        x0 = mean + s * torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        sig = torch.full((n,), sigma, dtype=torch.float64)
        loss = denoising_loss(gaussian_denoiser(mean, s), x0, sig, noise, weight=p.loss_weight(sig)).mean()
        assert loss.item() == pytest.approx(1.0, rel=0.01), sigma


class AffinePerSigma(nn.Module):
    """F(x_in, c_noise) = a(c_noise) x_in + b(c_noise): can represent the optimum for Gaussian data exactly."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(1, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 2))

    def forward(self, x, c_noise, cond=None):
        a, b = self.mlp(c_noise.view(-1, 1)).view(-1, 2, 1, 1, 1).unbind(1)
        return a * x + b


def test_a_tiny_network_trained_with_the_edm_objective_learns_the_exact_denoiser():
    """Train with EDM's sigma distribution, preconditioning and weight on Gaussian data N(0.3, 0.5^2): the learned
    denoiser approaches D*(x, sigma) = mean + s^2 / (s^2 + sigma^2) (x - mean) across the noise levels."""
    torch.manual_seed(0)
    mean, s = 0.3, 0.5
    p, net = EDMParameterization(s), AffinePerSigma()
    denoiser = Denoiser(net, p)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(2)
    for _ in range(1500):
        x0 = mean + s * torch.randn(256, 1, 2, 2, generator=g)
        sigma = p.sample_sigma(256, g, torch.device("cpu"))
        noise = torch.randn(x0.shape, generator=g)
        loss = denoising_loss(denoiser, x0, sigma, noise, weight=p.loss_weight(sigma)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    exact = gaussian_denoiser(mean, s)
    with torch.no_grad():
        for sigma in (0.05, 0.3, 1.0, 3.0):  # within the bulk of ln sigma ~ N(-1.2, 1.2^2)
            x = mean + math.sqrt(s**2 + sigma**2) * torch.randn(512, 1, 2, 2, generator=g)  # the marginal p_sigma
            err = (denoiser(x, torch.full((512,), sigma)) - exact(x, torch.full((512,), sigma))).abs().mean()
            spread = s * sigma / math.sqrt(s**2 + sigma**2)  # posterior std: the scale of a denoising error
            assert err < 0.1 * spread, (sigma, float(err), spread)


def test_the_noise_aware_classifier_sees_in_sigma_coordinates_what_it_was_trained_on():
    """Trained on q_sample(x0, t, n) and t; at sampling time NoisyClassifier builds the same input from x = x0 + sigma_t n
    through the VP parameterization (c_in x = x_t, c_noise = t)."""
    from difflab.models import NoisyClassifier
    from difflab.nn import UNetClassifier, unet_config
    from difflab.schedules import q_sample

    torch.manual_seed(0)
    schedule = make_schedule("linear", 1000)
    net = UNetClassifier(unet_config("tiny", image_size=8, in_channels=1, base_channels=16), 10).eval()
    clf = NoisyClassifier(net, VPParameterization(schedule), [str(i) for i in range(10)])
    x0, noise, t = torch.rand(4, 1, 8, 8) * 2 - 1, torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999])
    sigma = schedule.sigmas[t].float()
    with torch.no_grad():
        torch.testing.assert_close(clf(x0 + sigma.view(-1, 1, 1, 1) * noise, sigma),
                                   net(q_sample(x0, t, noise, schedule), t.float()), rtol=1e-4, atol=1e-4)


def test_edm_training_sigmas_are_log_normal():
    p = EDMParameterization(0.5)
    ln_sigma = p.sample_sigma(200_000, torch.Generator().manual_seed(3), torch.device("cpu")).log()
    assert ln_sigma.mean().item() == pytest.approx(-1.2, abs=0.01)
    assert ln_sigma.std().item() == pytest.approx(1.2, abs=0.01)


def test_edm_sampling_grid_and_defaults():
    p = EDMParameterization(0.5)
    torch.testing.assert_close(p.sampling_sigmas(18), karras_sigmas(18, 0.002, 80.0, 7.0))
    assert (p.default_sampler, p.default_steps("heun"), p.default_spacing) == ("heun", 18, "karras")
    assert p.prior_std(80.0) == 80.0
    with pytest.raises(DifflabError, match="continuous noise levels"):
        p.sampling_sigmas(10, "uniform")
    with pytest.raises(DifflabError, match="sigma_data"):
        EDMParameterization(0.0)


def test_vp_bookkeeping_matches_the_schedule():
    schedule = make_schedule("cosine", 200)
    p = VPParameterization(schedule, "v")
    assert p.sigma_min == pytest.approx(schedule.sigmas[0].item()) and p.sigma_max == pytest.approx(schedule.sigmas[-1].item())
    assert p.prior_std(p.sigma_max) == pytest.approx(math.sqrt(1 + p.sigma_max**2))
    assert (p.default_sampler, p.default_steps("ddpm"), p.default_steps("ddim")) == ("ddim", 200, 50)
    drawn = p.sample_sigma(5000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert set(drawn.tolist()) <= set(schedule.sigmas.float().tolist())  # discrete: only the schedule's own sigmas
    torch.testing.assert_close(p.c_noise(schedule.sigmas[[0, 50, 199]].float()), torch.tensor([0.0, 50.0, 199.0]),
                               rtol=0, atol=1e-3)


@pytest.mark.parametrize("p", [VPParameterization(make_schedule("sigmoid", 300), "x0", "eps"),
                               EDMParameterization(0.37, sigma_min=0.01, sigma_max=20.0, p_mean=-1.0, p_std=1.5)])
def test_parameterizations_round_trip_through_json(p):
    import json

    again = parameterization_from_config(json.loads(json.dumps(p.config())))
    assert type(again) is type(p) and again.config() == p.config()
    for a, b in zip(p.scalings(SIGMAS), again.scalings(SIGMAS)):
        torch.testing.assert_close(a, b)


def test_unknown_or_broken_parameterization_configs_are_one_line_errors():
    with pytest.raises(DifflabError, match="unknown parameterization"):
        parameterization_from_config({"kind": "flow"})
    with pytest.raises(DifflabError, match="incomplete"):
        parameterization_from_config({"kind": "vp", "prediction": "eps"})
    with pytest.raises(DifflabError, match="incomplete"):
        parameterization_from_config({"kind": "edm", "sigma_dta": 0.5})
