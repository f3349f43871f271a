"""Guidance against exact answers: a two-class Gaussian mixture has closed-form conditional and
unconditional denoisers and an exact noisy classifier, so every guidance identity can be checked."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.errors import DifflabError
from difflab.exact import gaussian_mixture_classifier, gaussian_mixture_denoiser
from difflab.guidance import classifier_free_guidance, classifier_guidance
from difflab.samplers import get_sampler
from difflab.schedules import make_schedule, sampling_sigmas

STD = 0.3
MEANS = torch.stack([torch.full((1, 2, 2), 0.6), torch.full((1, 2, 2), -0.6)]).double()  # (K=2, C, H, W)
NULL = 2


def _sample(denoiser, labels, sampler="ddim", steps=60, seed=0):
    sigmas = sampling_sigmas(make_schedule("linear", 1000), steps, "uniform")
    n = labels.shape[0]
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    x = torch.stack([torch.randn((1, 2, 2), generator=g) for g in gens]).double() * math.sqrt(1 + float(sigmas[0]) ** 2)
    return get_sampler(sampler)(denoiser, x, sigmas.double(), cond=labels, generator=gens)


def test_mixture_reference_is_consistent():
    den, clf = gaussian_mixture_denoiser(MEANS, STD), gaussian_mixture_classifier(MEANS, STD)
    x, sigma = torch.randn(5, 1, 2, 2).double(), torch.tensor([0.1, 0.5, 1.0, 3.0, 20.0]).double()
    labels = torch.tensor([0, 1, 2, 0, 1])
    out = den(x, sigma, labels)
    torch.testing.assert_close(out[2], den(x, sigma)[2])  # null label = unconditional
    post = torch.softmax(clf(x, sigma), 1)
    uncond = post[:, 0, None, None, None] * den(x, sigma, torch.zeros(5, dtype=torch.long)) \
        + post[:, 1, None, None, None] * den(x, sigma, torch.ones(5, dtype=torch.long))
    torch.testing.assert_close(den(x, sigma), uncond)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "euler_ancestral"])
def test_cfg_scale_0_is_unconditional_and_1_is_conditional(sampler):
    den = gaussian_mixture_denoiser(MEANS, STD)
    labels = torch.tensor([0, 1] * 8)
    for scale, reference in ((0.0, lambda x, s, c: den(x, s, None)), (1.0, den)):
        guided = _sample(classifier_free_guidance(den, scale, null_cond=torch.tensor([NULL])), labels, sampler)
        expected = _sample(reference, labels, sampler)
        torch.testing.assert_close(guided, expected, rtol=1e-9, atol=1e-9)
    # and w = 1 really is conditional: every sample lands in its own class's component
    cond = _sample(den, labels, sampler)
    assert ((cond.mean((1, 2, 3)) > 0) == (labels == 0)).all()


def test_cfg_uses_one_batched_network_call():
    calls = []
    den = gaussian_mixture_denoiser(MEANS, STD)

    def counted(x, sigma, cond=None):
        calls.append(x.shape[0])
        return den(x, sigma, cond)

    guided = classifier_free_guidance(counted, 3.0, null_cond=torch.tensor([NULL]))
    guided(torch.randn(4, 1, 2, 2).double(), torch.full((4,), 1.0).double(), torch.tensor([0, 1, 0, 1]))
    assert calls == [8]


def test_larger_cfg_scale_moves_samples_towards_the_class_mean():
    """w: 0 -> 1 carries samples from the mixture to their class; w > 1 keeps pushing along the same
    direction (past the class mean, away from the other class) and shrinks the spread: the
    fidelity-for-diversity trade of guidance, exact here."""
    den = gaussian_mixture_denoiser(MEANS, STD)
    labels = torch.tensor([0, 1] * 100)
    towards = torch.where(labels == 0, 1.0, -1.0).double()  # the class direction (its mean is +0.6 along it)
    position, spread, right_mode, distance = [], [], [], []
    for scale in (0.0, 0.5, 1.0, 2.0, 4.0):
        x = _sample(classifier_free_guidance(den, scale, null_cond=torch.tensor([NULL])), labels)
        along = x.mean((1, 2, 3)) * towards
        position.append(float(along.mean()))
        spread.append(float(along.std()))
        right_mode.append(float((along > 0).double().mean()))
        distance.append(float((x - MEANS[labels]).flatten(1).norm(dim=1).mean()))
    assert position == sorted(position) and abs(position[0]) < 0.1 and abs(position[2] - 0.6) < 0.03, position
    assert spread == sorted(spread, reverse=True), spread
    assert right_mode[0] < 0.65 and right_mode[2:] == [1.0, 1.0, 1.0], right_mode  # w = 0 ignores the label
    assert distance[2] < 0.4 * distance[0], distance


def test_guidance_rescale():
    den = gaussian_mixture_denoiser(MEANS, STD)
    x, sigma, labels = torch.randn(6, 1, 2, 2).double() * 3, torch.full((6,), 2.0).double(), torch.tensor([0, 1] * 3)
    plain = classifier_free_guidance(den, 5.0, null_cond=torch.tensor([NULL]))(x, sigma, labels)
    torch.testing.assert_close(classifier_free_guidance(den, 5.0, null_cond=torch.tensor([NULL]), rescale=0.0)(x, sigma, labels), plain)
    full = classifier_free_guidance(den, 5.0, null_cond=torch.tensor([NULL]), rescale=1.0)(x, sigma, labels)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), den(x, sigma, labels).std(dim=(1, 2, 3)))
    half = classifier_free_guidance(den, 5.0, null_cond=torch.tensor([NULL]), rescale=0.5)(x, sigma, labels)
    torch.testing.assert_close(half, 0.5 * (plain + full))
    with pytest.raises(DifflabError):
        classifier_free_guidance(den, 1.0, null_cond=torch.tensor([NULL]), rescale=1.5)


def test_classifier_guidance_with_the_exact_classifier_is_the_conditional_denoiser():
    den, clf = gaussian_mixture_denoiser(MEANS, STD), gaussian_mixture_classifier(MEANS, STD)
    guided = classifier_guidance(lambda x, s, c=None: den(x, s, None), clf, scale=1.0)
    x = torch.randn(8, 1, 2, 2).double() * 2
    sigma = torch.tensor([0.01, 0.1, 0.3, 1.0, 2.0, 5.0, 20.0, 80.0]).double()
    labels = torch.tensor([0, 1] * 4)
    with torch.no_grad():  # samplers run without autograd; the wrapper must switch it on for the gradient
        torch.testing.assert_close(guided(x, sigma, labels), den(x, sigma, labels), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sampler,steps", [("ddpm", 250), ("heun", 30)])
def test_classifier_guidance_reproduces_the_conditional_distribution(sampler, steps):
    den, clf = gaussian_mixture_denoiser(MEANS, STD), gaussian_mixture_classifier(MEANS, STD)
    guided = classifier_guidance(lambda x, s, c=None: den(x, s, None), clf, scale=1.0)
    labels = torch.zeros(400, dtype=torch.long)
    x = _sample(guided, labels, sampler, steps)
    # class 0 alone: mean 0.6 and std 0.3 per pixel (the unconditional mixture would have mean 0, std 0.67)
    assert abs(float(x.mean()) - 0.6) < 0.03 and abs(float(x.std()) - STD) < 0.03, (float(x.mean()), float(x.std()))
    stronger = _sample(classifier_guidance(lambda x, s, c=None: den(x, s, None), clf, scale=4.0), labels, sampler, steps)
    unguided = _sample(lambda x, s, c=None: den(x, s, None), labels, sampler, steps)
    assert float(unguided.mean()) < 0.3  # both classes
    assert float((stronger.mean((1, 2, 3)) > 0).double().mean()) == 1.0
