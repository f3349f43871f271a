"""Domain feature extractors: small classifiers trained by difflab and shipped with it, for measuring
generated images where the Inception-v3 weights of FID papers cannot be downloaded.

    extractor = load_domain_extractor("fashion-mnist")      # weights from difflab/assets, no network
    feats = extractor.features(x)                           # x float in [-1, 1], (N, 1 or 3, H, W) -> (N, 128)
    probs = extractor.probabilities(x)                      # (N, 10), rows sum to 1
    labels = extractor.predict(x)                           # (N,) class indices into extractor.class_names

**Not comparable with papers.** An FID, KID, IS or precision/recall computed on these features ranks models
trained on the same dataset against each other; it is a different number from the Inception FID that papers
report (``extractor.comparable_to_papers`` is False and ``extractor.name`` says ``domain-<dataset>``).

Each extractor is a :class:`difflab.nn.DomainClassifier` whose weights
(``assets/classifier-<dataset>.safetensors``) and JSON (``assets/classifier-<dataset>.json``: config, class
names, held-out accuracy, how it was trained) are written by ``benchmarks/train_domain_classifier.py``.
Held-out data: Fashion-MNIST's official 10,000-image test split; for the 1,797 UCI digits, which have no
official split, the last :data:`DIGITS_TEST_SIZE` images (see :func:`load_domain_split`).
MNIST weights are not shipped: MNIST could not be fetched where these classifiers were trained.
"""

from __future__ import annotations

import json
from importlib import resources

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from torch import nn

from difflab.data import ImageData, load_dataset
from difflab.errors import DifflabError
from difflab.nn.domain_classifier import DomainClassifier, DomainClassifierConfig

DOMAIN_EXTRACTORS = ("digits", "fashion-mnist")
DIGITS_TEST_SIZE = 360  # the last 20% of the 1,797 digits are held out; the first 1,437 train
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights, as Pillow's RGB -> L (what load_dataset uses)


def domain_name(dataset: str) -> str:
    """Normalise a dataset name (``"Fashion_MNIST"`` -> ``"fashion-mnist"``); unknown names raise
    :class:`DifflabError` listing the shipped ones."""
    key = str(dataset).strip().lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist"}.get(key, key)
    if key not in DOMAIN_EXTRACTORS:
        raise DifflabError(f"no domain feature extractor for {dataset!r}; shipped: {', '.join(DOMAIN_EXTRACTORS)} "
                           f"(MNIST weights are not shipped)")
    return key


def load_domain_split(dataset: str, split: str) -> ImageData:
    """The images a domain classifier trains on (``split="train"``) or is evaluated on (``"test"``).

    Fashion-MNIST: the official splits (60,000 / 10,000), read from local files only (no download).
    Digits: the first 1,437 of the 1,797 bundled digits train, the last :data:`DIGITS_TEST_SIZE` are held out.
    """
    key = domain_name(dataset)
    if split not in ("train", "test"):
        raise DifflabError(f"unknown split {split!r}; use 'train' or 'test'")
    if key == "digits":
        data = load_dataset("digits")
        part = slice(len(data) - DIGITS_TEST_SIZE, None) if split == "test" else slice(0, len(data) - DIGITS_TEST_SIZE)
        return ImageData(data.images[part], data.labels[part], data.class_names, data.name)
    return load_dataset(key, split=split, download=False, progress=False)


class DomainExtractor(nn.Module):
    """A frozen :class:`DomainClassifier` behind the feature-extractor protocol of :mod:`difflab.metrics`.

    Inputs are floats in [-1, 1], ``(N, C, H, W)`` with C = 1 or 3 and any H, W: RGB becomes luminance
    (BT.601), other sizes are resized to ``image_size`` (bilinear, antialiased), and the batch is moved to
    the extractor's device and run in chunks of ``batch_size`` without gradients. Values are not clamped.
    Outputs are float32 on the extractor's device. It stays in eval mode (``.train()`` is ignored), so
    BatchNorm never sees the statistics of the images it measures.
    """

    comparable_to_papers: bool = False  # domain features: never compare with Inception FID/IS from papers

    def __init__(self, model: DomainClassifier, *, dataset: str, class_names: list[str], test_accuracy: float,
                 batch_size: int = 500):
        super().__init__()
        self.model = model.requires_grad_(False)
        self.dataset = dataset
        self.name = f"domain-{dataset}"
        self.class_names = list(class_names)
        self.test_accuracy = float(test_accuracy)
        self.batch_size = batch_size
        self.image_size = model.config.image_size
        self.feature_dim = model.config.feature_dim
        self.num_classes = model.config.num_classes
        assert len(self.class_names) == self.num_classes, "one class name per logit"
        self.eval()

    def train(self, mode: bool = True) -> DomainExtractor:
        return super().train(False)  # frozen: BatchNorm keeps its stored statistics whatever the caller asks

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 1 or 3, H, W)`` floats in [-1, 1] -> ``(N, in_channels, image_size, image_size)`` float32
        on the extractor's device."""
        if not torch.is_tensor(images) or images.ndim != 4:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise DifflabError(f"{self.name} expects images as a (N, C, H, W) tensor, got {shape}")
        if not images.is_floating_point():
            raise DifflabError(f"{self.name} expects float images in [-1, 1], got {images.dtype}; "
                               f"convert uint8 pixels with difflab.data.to_model_range")
        if images.shape[1] not in (1, 3):
            raise DifflabError(f"{self.name} expects 1 (grayscale) or 3 (RGB) channels, got {images.shape[1]}")
        x = images.to(self.device, torch.float32)
        if x.shape[1] == 3 and self.model.config.in_channels == 1:  # luminance is affine in the pixels and
            x = torch.einsum("nchw,c->nhw", x, x.new_tensor(LUMA)).unsqueeze(1)  # LUMA sums to 1, so it holds
        elif x.shape[1] == 1 and self.model.config.in_channels == 3:  # in [-1, 1] as in 0..255: (N, 1, H, W)
            x = x.expand(-1, 3, -1, -1)
        s = self.image_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        return x  # (N, in_channels, image_size, image_size)

    @torch.no_grad()
    def _run(self, images: torch.Tensor, fn) -> torch.Tensor:
        x = self.preprocess(images)
        if len(x) == 0:
            return fn(x)
        return torch.cat([fn(chunk) for chunk in x.split(self.batch_size)]).float()

    def _features_and_logits(self, x: torch.Tensor) -> torch.Tensor:
        f = self.model.features(x)                          # (N, D)
        return torch.cat([f, self.model.head(f)], dim=1)    # (N, D + K); dropout is off in eval mode

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features: ``(N, C, H, W) -> (N, feature_dim)`` float32."""
        return self._run(images, self.model.features)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits: ``(N, C, H, W) -> (N, num_classes)`` float32."""
        return self._run(images, self.model)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax class probabilities: ``(N, C, H, W) -> (N, num_classes)``, rows summing to 1."""
        return self.logits(images).softmax(dim=1)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Most probable class: ``(N, C, H, W) -> (N,)`` int64 indices into ``class_names``."""
        return self.logits(images).argmax(dim=1)

    def features_and_probabilities(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both in one pass (what ``difflab.metrics.compute_features`` asks for): ``(N, D)``, ``(N, K)``."""
        both = self._run(images, self._features_and_logits)                       # (N, D + K)
        feats, logits = both.split([self.feature_dim, self.num_classes], dim=1)  # (N, D), (N, K)
        return feats, logits.softmax(dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`features`."""
        return self.features(images)


def load_domain_extractor(dataset: str, device: str | torch.device = "cpu") -> DomainExtractor:
    """The shipped classifier for ``dataset`` (one of :data:`DOMAIN_EXTRACTORS`) as a :class:`DomainExtractor`,
    loaded from the package assets (safetensors + JSON; nothing is downloaded or unpickled)."""
    key = domain_name(dataset)
    assets = resources.files("difflab") / "assets"
    weights_file, meta_file = assets / f"classifier-{key}.safetensors", assets / f"classifier-{key}.json"
    if not (weights_file.is_file() and meta_file.is_file()):
        raise DifflabError(f"the {key} classifier files are missing from difflab/assets; reinstall difflab or run "
                           f"benchmarks/train_domain_classifier.py --datasets {key}")
    meta = json.loads(meta_file.read_text())
    model = DomainClassifier(DomainClassifierConfig.from_dict(meta["config"]))
    model.load_state_dict(load_safetensors(weights_file.read_bytes()), strict=True)
    return DomainExtractor(model, dataset=key, class_names=meta["class_names"],
                           test_accuracy=meta["test_accuracy"]).to(device)
