"""Reconstruction metrics (PSNR, SSIM): cross-checks against torchmetrics and a brute-force SSIM, exact
answers (identical images, a constant offset), symmetry, the small-image window rule and the errors.

torchmetrics' SSIM reflect-pads each image by half its kernel and averages the whole map; difflab's SSIM
averages only the valid region (no padding). The oracle here is therefore torchmetrics' full SSIM map
(``return_full_image=True``) cropped by half the kernel on each side: exactly the valid region."""

import math

import pytest
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio as tm_psnr
from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

from difflab.errors import DifflabError
from difflab.metrics import psnr, ssim


def _random_pair(shape, seed):
    """Random images in [-1, 1] and a noisy reconstruction of them, float32."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g) * 2 - 1
    y = (x + 0.2 * torch.randn(shape, generator=g)).clamp(-1, 1)
    return x, y


def _structured_pair(shape):
    """Ramps, a checkerboard, a sinusoid and a disk, with reconstructions that blur, shift, rescale and
    offset them: SSIM values spread well away from both 0 and 1."""
    n, c, h, w = shape
    i = torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w)
    j = torch.arange(w, dtype=torch.float32).view(1, w).expand(h, w)
    bases = [
        (i + j) / (h + w - 2) * 2 - 1,  # diagonal ramp
        ((i // 4 + j // 4) % 2) * 2 - 1,  # checkerboard of 4x4 squares
        torch.sin(2 * math.pi * i / 9) * torch.cos(2 * math.pi * j / 13),  # sinusoid
        (((i - h / 2) ** 2 + (j - w / 2) ** 2) < (h / 3) ** 2).float() * 1.6 - 0.8,  # disk
    ]
    x = torch.stack([torch.stack([bases[(k + ch) % 4] for ch in range(c)]) for k in range(n)])
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    y = torch.stack(
        [
            blurred[0],  # blur
            torch.roll(x[1], shifts=1, dims=-1),  # one-pixel shift
            0.6 * x[2],  # lower contrast
            (x[3] + 0.3).clamp(-1, 1),  # brightness offset
        ][:n]
    )
    return x, y


def _tm_valid_ssim(x, y, *, sigma=1.5, data_range=2.0):
    """torchmetrics' SSIM map (float64) cropped to the valid region, averaged per image."""
    kernel = int(3.5 * sigma + 0.5) * 2 + 1  # torchmetrics sizes the Gaussian kernel from sigma
    half = (kernel - 1) // 2
    _, full = tm_ssim(
        x.double(), y.double(), gaussian_kernel=True, sigma=sigma, kernel_size=kernel, data_range=data_range,
        reduction="none", return_full_image=True,
    )
    return full[..., half:-half, half:-half].flatten(1).mean(dim=1)


def _brute_ssim(x, y, *, size, sigma, data_range=2.0, k1=0.01, k2=0.03):
    """Wang et al. 2004 eqs. (13)-(17) written out on every window position (unfold), with the variances
    in their centred form sum w (x - mu)^2: independent of the conv arithmetic under test."""
    x, y = x.double(), y.double()
    n, c = x.shape[:2]
    d = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(d**2) / (2 * sigma**2))
    weights = torch.outer(g, g).flatten()
    weights = (weights / weights.sum()).view(1, 1, -1, 1)
    px = torch.nn.functional.unfold(x, size).view(n, c, size * size, -1)  # (N, C, s*s, positions)
    py = torch.nn.functional.unfold(y, size).view(n, c, size * size, -1)
    mx, my = (weights * px).sum(2), (weights * py).sum(2)
    vx = (weights * (px - mx.unsqueeze(2)) ** 2).sum(2)
    vy = (weights * (py - my.unsqueeze(2)) ** 2).sum(2)
    cxy = (weights * (px - mx.unsqueeze(2)) * (py - my.unsqueeze(2))).sum(2)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(dim=1)


SHAPES = [(4, 1, 32, 32), (4, 3, 32, 32), (4, 1, 28, 28), (4, 3, 28, 28)]
PAIRS = [pytest.param("random", id="random"), pytest.param("structured", id="structured")]


def _pair(kind, shape):
    return _random_pair(shape, seed=sum(shape)) if kind == "random" else _structured_pair(shape)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", PAIRS)
def test_psnr_matches_torchmetrics(kind, shape):
    x, y = _pair(kind, shape)
    ours = psnr(x, y)
    # torchmetrics converts to dB with a float32 log(10), so it agrees to ~1e-7 relative, not to float64.
    ref = tm_psnr(x.double(), y.double(), data_range=2.0, reduction="none", dim=(1, 2, 3))
    assert ours.shape == (shape[0],) and ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref.double(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", PAIRS)
def test_ssim_matches_torchmetrics_valid_region(kind, shape):
    x, y = _pair(kind, shape)
    ours = ssim(x, y)
    assert ours.shape == (shape[0],) and ours.dtype == torch.float64
    assert ours.min() < 0.9  # the pairs really differ: a non-trivial comparison
    torch.testing.assert_close(ours, _tm_valid_ssim(x, y), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, _brute_ssim(x, y, size=11, sigma=1.5), atol=1e-10, rtol=0)


def test_ssim_data_range_and_constants_reach_the_formula():
    x, y = _random_pair((3, 2, 20, 24), seed=7)
    # Scaling the images and L together scales every term and C1, C2 alike: SSIM does not change.
    torch.testing.assert_close(ssim(x / 2, y / 2, data_range=1.0), ssim(x, y), atol=1e-12, rtol=0)
    x01, y01 = (x + 1) / 2, (y + 1) / 2  # the same images in [0, 1]
    ours01 = ssim(x01, y01, data_range=1.0)
    torch.testing.assert_close(ours01, _tm_valid_ssim(x01, y01, data_range=1.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        ssim(x, y, k1=0.05, k2=0.1, sigma=1.0, window=7), _brute_ssim(x, y, size=7, sigma=1.0, k1=0.05, k2=0.1),
        atol=1e-10, rtol=0,
    )


def test_identical_images():
    x, _ = _random_pair((3, 3, 32, 32), seed=1)
    assert torch.equal(ssim(x, x), torch.ones(3, dtype=torch.float64))
    assert torch.isinf(psnr(x, x)).all() and (psnr(x, x) > 0).all()
    x8, _ = _random_pair((2, 1, 8, 8), seed=2)
    assert torch.equal(ssim(x8, x8), torch.ones(2, dtype=torch.float64))


def test_psnr_of_a_constant_offset_is_the_closed_form():
    # Pixels on a 1/128 grid and power-of-two offsets: x + c is exact in float32, so MSE = c^2 exactly and
    # PSNR = 10 log10(L^2 / c^2) = 20 log10(L / c).
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-128, 64, (4, 3, 16, 16), generator=g).float() / 128
    offsets = torch.tensor([0.25, 0.5, 0.125, 1 / 64])
    y = x + offsets.view(4, 1, 1, 1)
    expected = torch.tensor([20 * math.log10(2.0 / c) for c in offsets.tolist()], dtype=torch.float64)
    torch.testing.assert_close(psnr(x, y), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(psnr(y, x), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(psnr(x / 2, y / 2, data_range=1.0), expected, atol=1e-12, rtol=0)  # scale-free


def test_ssim_is_symmetric():
    for x, y in (_random_pair((4, 3, 28, 28), seed=4), _structured_pair((4, 1, 32, 32)), _random_pair((2, 1, 8, 8), 5)):
        assert torch.equal(ssim(x, y), ssim(y, x))


def test_small_images_shrink_the_window():
    # 8x8 digits are smaller than the 11x11 window: it shrinks to 7x7 (largest odd <= 8), same sigma.
    x, y = _random_pair((4, 1, 8, 8), seed=6)
    shrunk = ssim(x, y)
    torch.testing.assert_close(shrunk, ssim(x, y, window=7), atol=0, rtol=0)
    torch.testing.assert_close(shrunk, _brute_ssim(x, y, size=7, sigma=1.5), atol=1e-10, rtol=0)
    assert (shrunk - ssim(x, y, window=5)).abs().max() > 1e-3  # not some other window
    # torchmetrics builds a 7x7 kernel for sigma 0.9: the shrunk window agrees with its valid region.
    torch.testing.assert_close(ssim(x, y, sigma=0.9), _tm_valid_ssim(x, y, sigma=0.9), atol=1e-5, rtol=0)
    # Non-square and even sides: the smaller side decides, rounded down to odd (6 -> 5, 9 -> 9).
    x2, y2 = _random_pair((2, 3, 6, 12), seed=8)
    torch.testing.assert_close(ssim(x2, y2), _brute_ssim(x2, y2, size=5, sigma=1.5), atol=1e-10, rtol=0)
    x3, y3 = _random_pair((2, 1, 9, 30), seed=9)
    torch.testing.assert_close(ssim(x3, y3), _brute_ssim(x3, y3, size=9, sigma=1.5), atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda: ssim(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 9)), "same shape"),
        (lambda: ssim(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8)), "(N, C, H, W)"),
        (lambda: psnr(torch.zeros(2, 1, 8, 8), torch.zeros(2, 3, 8, 8)), "same shape"),
        (lambda: psnr(torch.zeros(8, 8), torch.zeros(8, 8)), "(N, C, H, W)"),
        (lambda: psnr(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), data_range=0.0), "data_range"),
        (lambda: ssim(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16), window=10), "odd"),
        (lambda: ssim(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16), sigma=0.0), "sigma"),
    ],
)
def test_user_mistakes_raise_one_line_errors(call, fragment):
    with pytest.raises(DifflabError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and fragment in message
