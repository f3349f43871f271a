"""The FID Inception-v3: the network, its TF-compatible preprocessing, and finding its weights.

FID, KID and IS in papers are measured with one particular network: the Inception-v3 graph that TensorFlow
released on 2015-12-05 (``pool_3`` features, 2048-d; a 1008-way classifier). Its weights, converted to a
PyTorch state dict, are the file ``weights-inception-2015-12-05-6726825d.pth`` that torch-fidelity publishes
and that torch-fidelity and torchmetrics load through ``torch.hub``.

Why the network is written out here rather than imported from torch-fidelity: every FID package on PyPI
(torch-fidelity, pytorch-fid, clean-fid, and torchmetrics through torch-fidelity) imports torchvision, and
torchvision cannot be installed beside the torch this project pins; installing torch-fidelity without it
even breaks ``import torchmetrics``. :class:`FIDInceptionV3` has the same modules and parameter names as
torch-fidelity's ``FeatureExtractorInceptionV3`` and loads the same file, and the preprocessing follows the
TF graph exactly: images quantised to 8 bits, resized to 299 x 299 with TensorFlow 1.x bilinear resizing
(``align_corners=False``: no half-pixel offset), then scaled by ``(x - 128) / 128``.

The FID-specific details of the TF graph, which torchvision's Inception lacks: BatchNorm eps 1e-3, average
pools in the mixed blocks exclude padding from the count, and the last mixed block pools with max, not average.
"""

from __future__ import annotations

import urllib.error
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import DifflabError

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
INPUT_SIZE = 299


# ------------------------------------------------------------------------------------------------------
# The network — Szegedy et al. 2016, "Rethinking the Inception architecture", Figures 5-7 and Table 1,
# in the variant of the 2015-12-05 TensorFlow graph.
# ------------------------------------------------------------------------------------------------------
class ConvBN(nn.Module):
    """Convolution without bias, BatchNorm (eps 1e-3), ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    # TF's SAME average pooling divides by the number of real (unpadded) inputs.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35 x 35 block (Fig. 5): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 64, 1)
        self.branch5x5_1 = ConvBN(c_in, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(c_in, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_3x3(x)),
        ], dim=1)


class InceptionB(nn.Module):
    """35 -> 17 grid reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)


class InceptionC(nn.Module):
    """17 x 17 block (Fig. 6) with factorised 7x7 convolutions (1x7 then 7x1)."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = ConvBN(c_in, 192, 1)
        self.branch7x7_1 = ConvBN(c_in, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, **row)
        self.branch7x7_3 = ConvBN(c7, 192, **col)
        self.branch7x7dbl_1 = ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_3 = ConvBN(c7, c7, **row)
        self.branch7x7dbl_4 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = ConvBN(c7, 192, **row)
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = conv(b7d)
        return torch.cat([self.branch1x1(x), b7, b7d, self.branch_pool(_avg_pool_3x3(x))], dim=1)


class InceptionD(nn.Module):
    """17 -> 8 grid reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(c_in, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class InceptionE(nn.Module):
    """8 x 8 block (Fig. 7) with expanded 1x3 / 3x1 outputs; `pool` is "avg" (Mixed_7b) or "max" (Mixed_7c)."""

    def __init__(self, c_in: int, pool: str):
        super().__init__()
        row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
        self.pool = pool
        self.branch1x1 = ConvBN(c_in, 320, 1)
        self.branch3x3_1 = ConvBN(c_in, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, **row)
        self.branch3x3_2b = ConvBN(384, 384, **col)
        self.branch3x3dbl_1 = ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, **row)
        self.branch3x3dbl_3b = ConvBN(384, 384, **col)
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        # The TF graph's last block max-pools here (a quirk that FID inherits).
        pooled = _avg_pool_3x3(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d),
            self.branch_pool(pooled),
        ], dim=1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 of the 2015-12-05 TF graph; parameter names match torch-fidelity's weight file.

    ``forward(x)`` takes the network input (N, 3, 299, 299) scaled to [-1, 1] (see :func:`preprocess`)
    and returns ``(pool3, logits)``: the 2048-d features FID/KID/PR use (N, 2048) and the 1008-way logits
    without the fc bias (N, 1008), the "unbiased" logits that torch-fidelity and torchmetrics feed to IS.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))    # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                           # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                          # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                           # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))                     # (N, 288, 35, 35)
        x = self.Mixed_6a(x)                                                   # (N, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))      # (N, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))                     # (N, 2048, 8, 8)
        pool3 = x.mean(dim=(2, 3))                                             # (N, 2048)
        return pool3, pool3 @ self.fc.weight.T                                 # (N, 2048), (N, 1008)


# ------------------------------------------------------------------------------------------------------
# Preprocessing, as in the TF graph the FID papers ran.
# ------------------------------------------------------------------------------------------------------
def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1.x ``resize_bilinear(align_corners=False)``: output pixel i samples the input at
    i * (in / out), with no half-pixel offset; (N, C, H, W) float -> (N, C, size, size)."""

    def along(x: torch.Tensor, dim: int) -> torch.Tensor:
        n_in = x.shape[dim]
        pos = torch.arange(size, device=x.device, dtype=torch.float32) * (n_in / size)
        lo = pos.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        w = (pos - lo).to(x.dtype)
        shape = [1] * x.dim()
        shape[dim] = size
        a, b = x.index_select(dim, lo), x.index_select(dim, hi)
        return a + (b - a) * w.view(shape)

    return along(along(x, 3), 2)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (N, 1 or 3, H, W) -> the network input (N, 3, 299, 299) in [-1, 1].

    The graph saw 8-bit images: [-1, 1] is mapped to 0..255 the way images are written to PNG
    (x * 127.5 + 128, floored, clipped), gray is repeated to RGB, then TF1-resized and scaled (v - 128) / 128.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise DifflabError(f"Inception features need images (N, 1 or 3, H, W); got shape {tuple(images.shape)}")
    x = (images.float() * 127.5 + 128).clamp(0, 255).floor()                   # (N, C, H, W) uint8 values
    x = x.expand(-1, 3, -1, -1)                                                # (N, 3, H, W)
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = resize_bilinear_tf1(x, INPUT_SIZE)                                 # (N, 3, 299, 299)
    return (x - 128) / 128


# ------------------------------------------------------------------------------------------------------
# The weights and the extractor.
# ------------------------------------------------------------------------------------------------------
def cached_weights_path() -> Path:
    """Where torch.hub (and so torch-fidelity and torchmetrics) caches the FID Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def _missing_weights_error(reason: str) -> DifflabError:
    return DifflabError(
        f"FID Inception weights not found ({reason}): download {WEIGHTS_URL} on a machine with internet access, "
        f"then pass --inception-weights PATH (or put the file at {cached_weights_path()})"
    )


def find_weights(weights_path: str | Path | None = None) -> Path:
    """The weight file: `weights_path` if given, else the torch.hub cache, downloading into it if absent."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise DifflabError(f"--inception-weights: no such file: {path}")
        return path
    path = cached_weights_path()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(WEIGHTS_URL, str(path), progress=False)
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            raise _missing_weights_error(f"download failed: {type(err).__name__}") from None
    return path


class InceptionExtractor(nn.Module):
    """The standard FID feature extractor: 2048-d pool3 features and 1008-way class probabilities.

    ``probabilities`` is the softmax of the logits without the fc bias, as torch-fidelity and torchmetrics
    compute the Inception Score. The network runs in float32, in eval mode, without gradients.
    """

    name = "inception-v3-fid"
    comparable_to_papers = True

    def __init__(self, weights_path: str | Path | None = None, device: str | torch.device = "cpu"):
        super().__init__()
        path = find_weights(weights_path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated download, an HTML page, a pickle with code in it
            raise DifflabError(f"cannot read the Inception weights {path}: {type(err).__name__}") from None
        self.network = FIDInceptionV3()
        try:
            self.network.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError):
            raise DifflabError(f"{path} is not the FID Inception weight file {WEIGHTS_FILE}") from None
        self.requires_grad_(False)
        self.eval()
        self.to(device)
        self.weights_path = path

    @property
    def device(self) -> torch.device:
        return self.network.fc.weight.device

    def train(self, mode: bool = True) -> InceptionExtractor:
        return super().train(False)  # BatchNorm must keep its running statistics: always eval

    @torch.no_grad()
    def features_and_probabilities(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One network pass: pool3 features (N, 2048) and class probabilities (N, 1008)."""
        pool3, logits = self.network(preprocess(images.to(self.device)))
        return pool3, logits.softmax(dim=1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_probabilities(images)[0]

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_probabilities(images)[1]
