"""One DDPM and one DDIM step agree with diffusers' schedulers for the same betas, model output and noise."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers import scheduling_ddpm
from torch import nn

from difflab.denoisers import Denoiser, VPParameterization
from difflab.guidance import clip_x0
from difflab.samplers import sample_ddim, sample_ddpm
from difflab.schedules import make_schedule

PREDICTION_NAMES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


class FixedOutput(nn.Module):
    """A 'network' that returns a fixed tensor, so both libraries see the same model output."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, t, cond=None):
        return self.out


def our_step(step_fn, schedule, prediction, model_out, x_t, t, t_prev, seed, **options):
    """Run one of our samplers for the single step t -> t_prev, converting DDPM coordinates to sigma coordinates."""
    abar = schedule.alphas_cumprod
    abar_prev = abar[t_prev] if t_prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
    sigmas = torch.stack([schedule.sigmas[t], ((1 - abar_prev) / abar_prev).sqrt()])
    x = x_t / abar[t].sqrt().float()  # x = x_t / sqrt(abar_t)
    denoiser = Denoiser(FixedOutput(model_out), VPParameterization(schedule, prediction))
    if options.pop("clip", False):
        denoiser = clip_x0(denoiser)
    out = step_fn(denoiser, x, sigmas, generator=torch.Generator().manual_seed(seed), **options)
    return out * abar_prev.sqrt().float()


def random_pair(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)


def in_float64(ref, schedule):
    """Give a diffusers scheduler our float64 tables so it computes the step in float64.

    In float32 diffusers' 1 - abar_t loses ~1e-3 relative accuracy near t = 0 (we measured step errors of
    3e-4 against a float64 evaluation of DDPM eq. 7, ours 3e-7), which would hide real disagreements."""
    ref.betas, ref.alphas, ref.alphas_cumprod = schedule.betas, schedule.alphas, schedule.alphas_cumprod
    ref.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(ref, "final_alpha_cumprod"):
        ref.final_alpha_cumprod = ref.one
    return ref


def assert_step_close(got, expected, t):
    # the float32 result against diffusers' float64 one: float32 precision of values of size ~4
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=2e-6 * max(1.0, float(expected.abs().max())), msg=f"t={t}")


@pytest.mark.parametrize("schedule_name,diffusers_name", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("variance,variance_type", [("posterior", "fixed_small"), ("beta", "fixed_large")])
@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_step_matches_diffusers(schedule_name, diffusers_name, prediction, variance, variance_type, clip, monkeypatch):
    schedule = make_schedule(schedule_name, 1000)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=diffusers_name, variance_type=variance_type,
                        prediction_type=PREDICTION_NAMES[prediction], clip_sample=clip)
    ref.set_timesteps(1000)
    in_float64(ref, schedule)
    for t in (999, 700, 250, 10, 1, 0):
        model_out, x_t = random_pair(t)
        # diffusers would draw float64 noise: hand it the float32 draw our sampler makes from the same seed
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(t)).double()
        monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: noise)
        expected = ref.step(model_out.double(), t, x_t.double()).prev_sample
        got = our_step(sample_ddpm, schedule, prediction, model_out, x_t, t, t - 1, t, variance=variance, clip=clip)
        assert_step_close(got, expected, t)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_step_matches_diffusers(prediction, eta, clip):
    schedule = make_schedule("linear", 1000)
    # use_clipped_model_output: like our clip_x0 wrapper, re-derive eps from the clipped x0
    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=PREDICTION_NAMES[prediction],
                        clip_sample=clip, set_alpha_to_one=True, timestep_spacing="leading")
    ref.set_timesteps(50)
    in_float64(ref, schedule)
    for t in ref.timesteps.tolist()[::7] + [0]:
        model_out, x_t = random_pair(t)
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(t)).double()
        expected = ref.step(model_out.double(), t, x_t.double(), eta=eta, variance_noise=noise,
                            use_clipped_model_output=clip).prev_sample
        got = our_step(sample_ddim, schedule, prediction, model_out, x_t, t, t - 20, t, eta=eta, clip=clip)
        assert_step_close(got, expected, t)


def test_float32_diffusers_agrees_away_from_t0():
    """Also against the stock float32 scheduler, where its own rounding is small (t >= 10)."""
    schedule = make_schedule("linear", 1000)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    ref.set_timesteps(1000)
    for t in (999, 500, 50, 10):
        model_out, x_t = random_pair(t)
        expected = ref.step(model_out, t, x_t, generator=torch.Generator().manual_seed(t)).prev_sample
        got = our_step(sample_ddpm, schedule, "eps", model_out, x_t, t, t - 1, t)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=f"t={t}")
