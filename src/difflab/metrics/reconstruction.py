"""Image-reconstruction metrics for autoencoders: PSNR and SSIM, one value per image.

Both take two image batches of the same shape (N, C, H, W), by default in [-1, 1] (``data_range=2``),
compute in float64 and return a float64 tensor (N,). Unlike the feature metrics of
:mod:`difflab.metrics.formulas`, these compare each reconstruction with its own original.

    psnr(decoded, images)      # dB, inf where the two are identical
    ssim(decoded, images)      # in [-1, 1], 1 where the two are identical
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from difflab.errors import DifflabError


def _pair_as_float64(x: torch.Tensor, y: torch.Tensor, data_range: float, what: str):
    """x and y as float64 (N, C, H, W) tensors, or a one-line error."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise DifflabError(f"{what} takes two torch tensors; got {type(x).__name__} and {type(y).__name__}")
    if x.ndim != 4 or x.shape != y.shape:
        raise DifflabError(
            f"{what} needs two image batches of the same shape (N, C, H, W); got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if not data_range > 0:
        raise DifflabError(f"{what}: data_range must be positive (2 for images in [-1, 1]); got {data_range}")
    return x.detach().double(), y.detach().double()


# ---------------------------------------------------------------------------------------------------------
# PSNR — peak signal-to-noise ratio, e.g. Wang et al. 2004 (below), §I:
#   PSNR = 10 log10(L^2 / MSE),  MSE = mean over C, H, W of (x - y)^2,  L = data_range
# ---------------------------------------------------------------------------------------------------------
def psnr(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of each image pair, (N,) float64.

    ``data_range`` is the width of the pixel range: 2 for images in [-1, 1] (the default), 1 for [0, 1],
    255 for 8-bit. The mean squared error is taken over channels and pixels of each image; identical
    images give ``inf``."""
    x, y = _pair_as_float64(x, y, data_range, "psnr")
    mse = (x - y).square().flatten(1).mean(dim=1)  # (N,)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """A (size,) float64 Gaussian centred on the middle sample, summing to 1."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return g / g.sum()


# ---------------------------------------------------------------------------------------------------------
# SSIM — Wang, Bovik, Sheikh, Simoncelli 2004, "Image quality assessment: from error visibility to
# structural similarity", eq. (13) with the weighted local statistics of eqs. (14)-(16):
#   SSIM(x, y) = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)),
#   C1 = (K1 L)^2, C2 = (K2 L)^2,
# each statistic weighted by an 11x11 circular-symmetric Gaussian (sigma 1.5, normalised to sum 1), and
# the mean SSIM of eq. (17) averaged over every window position lying wholly inside the image ("valid",
# as in the authors' ssim_index.m with filter2(..., 'valid')), and here over channels too.
# Weighted variances are E_w[x^2] - mu_x^2 (equal to eq. 15 since the weights sum to 1); float64 keeps
# that difference accurate.
# ---------------------------------------------------------------------------------------------------------
def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    data_range: float = 2.0,  # L: 2 for images in [-1, 1], 1 for [0, 1], 255 for 8-bit
    window: int = 11,  # side of the square Gaussian window (odd)
    sigma: float = 1.5,  # standard deviation of the Gaussian window, in pixels
    k1: float = 0.01,  # C1 = (k1 L)^2 stabilises the luminance term
    k2: float = 0.03,  # C2 = (k2 L)^2 stabilises the contrast-structure term
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) of each image pair, (N,) float64; symmetric in x and y.

    The local statistics use a ``window`` x ``window`` Gaussian of standard deviation ``sigma`` and are
    taken only where the window lies wholly inside the image (no padding); the SSIM map is averaged over
    those positions and over channels.

    Images smaller than the window (the 8x8 digits, say) shrink it: the window side becomes the largest
    odd number not above ``min(window, H, W)`` (7 for 8x8 images), with the same ``sigma`` and the Gaussian
    renormalised, so an image too small for 11x11 still gets a score instead of an error.

    torchmetrics' ``structural_similarity_index_measure`` (1.9) differs by construction: it reflect-pads
    each image by half the kernel and averages the SSIM map over the whole image, border positions
    included. Its ``return_full_image=True`` map cropped by half the kernel on each side is this valid
    region, and its mean agrees with this function."""
    x, y = _pair_as_float64(x, y, data_range, "ssim")
    if window < 1 or window % 2 == 0:
        raise DifflabError(f"ssim: window must be a positive odd number of pixels; got {window}")
    if not sigma > 0:
        raise DifflabError(f"ssim: sigma must be positive; got {sigma}")
    n, c, h, w = x.shape
    size = min(window, h, w)
    size -= 1 - size % 2  # largest odd side that fits
    if size < 1:
        raise DifflabError(f"ssim needs images of at least 1x1 pixels; got {h}x{w}")

    g = _gaussian_window(size, sigma)
    kernel = torch.outer(g, g).expand(c, 1, size, size)  # (C, 1, s, s): one window per channel

    def local_mean(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=c)  # (N, C, H - s + 1, W - s + 1)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x * mu_x
    var_y = local_mean(y * y) - mu_y * mu_y
    cov_xy = local_mean(x * y) - mu_x * mu_y

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)  # (N,)
