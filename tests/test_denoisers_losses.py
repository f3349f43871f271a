"""Parameterizations agree for the same underlying prediction; the one loss equals the tutorial's."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from difflab.denoisers import Denoiser, VPParameterization
from difflab.errors import DifflabError
from difflab.exact import gaussian_denoiser
from difflab.losses import denoising_loss
from difflab.schedules import make_schedule, q_sample

SCHEDULE = make_schedule("linear", 1000)


class Oracle(nn.Module):
    """Outputs the eps / x0 / v target that corresponds to a fixed x0 guess, from the network input x_t."""

    def __init__(self, x0_guess, prediction):
        super().__init__()
        self.x0_guess, self.prediction = x0_guess, prediction

    def forward(self, x_t, t, cond=None):
        # in float64, so the oracle itself adds no rounding error at small sigma
        abar = SCHEDULE.alphas_cumprod[t.round().long()].view(-1, 1, 1, 1)
        a, s, x0 = abar.sqrt(), (1 - abar).sqrt(), self.x0_guess.double()
        eps = (x_t.double() - a * x0) / s  # x_t = a x0 + s eps
        return {"eps": eps, "x0": x0, "v": a * eps - s * x0}[self.prediction]


def test_eps_x0_v_parameterizations_agree():
    g = torch.Generator().manual_seed(0)
    x0_guess = torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([0, 5, 100, 400, 800, 999])
    sigma = SCHEDULE.sigmas[t].float()
    x = torch.randn(6, 3, 4, 4, generator=g) * (1 + sigma.view(-1, 1, 1, 1))
    outs = {p: Denoiser(Oracle(x0_guess, p), VPParameterization(SCHEDULE, p))(x, sigma) for p in ("eps", "x0", "v")}
    for p in ("eps", "v"):
        torch.testing.assert_close(outs[p], outs["x0"], rtol=1e-4, atol=1e-4 * float(sigma.max()) * 1e-2)
    torch.testing.assert_close(outs["v"], x0_guess, rtol=1e-4, atol=1e-4)


def test_network_sees_ddpm_input_and_timestep():
    seen = {}

    class Spy(nn.Module):
        def forward(self, x_t, t, cond=None):
            seen["x_t"], seen["t"] = x_t, t
            return torch.zeros_like(x_t)

    x0 = torch.randn(3, 1, 4, 4)
    noise = torch.randn(3, 1, 4, 4)
    t = torch.tensor([3, 300, 999])
    sigma = SCHEDULE.sigmas[t].float()
    Denoiser(Spy(), VPParameterization(SCHEDULE, "eps"))(x0 + sigma.view(-1, 1, 1, 1) * noise, sigma)
    torch.testing.assert_close(seen["x_t"], q_sample(x0, t, noise, SCHEDULE), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(seen["t"], t.float(), rtol=0, atol=1e-3)


def test_eps_weighting_is_the_tutorial_loss():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 1, 8, 8, generator=g)
    noise = torch.randn(5, 1, 8, 8, generator=g)
    t = torch.tensor([0, 1, 10, 500, 999])
    sigma = SCHEDULE.sigmas[t].float()
    net = nn.Conv2d(1, 1, 3, padding=1)

    class Net(nn.Module):
        def forward(self, x_t, tt, cond=None):
            return net(x_t)

    loss = denoising_loss(Denoiser(Net(), VPParameterization(SCHEDULE, "eps")), x0, sigma, noise,
                          weight=VPParameterization(SCHEDULE, weighting="eps").loss_weight(sigma))
    eps_hat = net(q_sample(x0, t, noise, SCHEDULE))
    expected = F.mse_loss(eps_hat, noise, reduction="none").flatten(1).mean(1)  # ||eps - eps_theta(x_t, t)||^2
    torch.testing.assert_close(loss, expected, rtol=2e-3, atol=1e-5)


def test_exact_denoiser_has_zero_x0_loss_only_in_expectation():
    # the Bayes-optimal denoiser minimises the x0 loss: any other shrinkage does worse
    g = torch.Generator().manual_seed(2)
    x0 = 0.5 + 0.2 * torch.randn(50_000, 1, 1, 1, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.full((x0.shape[0],), 0.3)
    best = denoising_loss(gaussian_denoiser(0.5, 0.2), x0, sigma, noise).mean()
    worse = denoising_loss(gaussian_denoiser(0.5, 0.3), x0, sigma, noise).mean()
    assert best < worse
    assert best.item() == pytest.approx(0.2**2 * 0.3**2 / (0.2**2 + 0.3**2), rel=2e-2)  # posterior variance


def test_weights_are_the_output_space_mse():
    sigma = torch.tensor([0.1, 1.0, 10.0])
    for p in ("eps", "x0", "v"):
        _, c_out, _ = VPParameterization(SCHEDULE, p).scalings(sigma)
        torch.testing.assert_close(VPParameterization(SCHEDULE, p).loss_weight(sigma), c_out**-2)
    with pytest.raises(DifflabError):
        VPParameterization(SCHEDULE, "eps", weighting="snr")
    with pytest.raises(DifflabError, match="prediction"):
        VPParameterization(SCHEDULE, "score")
