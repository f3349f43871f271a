"""Feature extractors and the plumbing between images and the formulas in :mod:`difflab.metrics.formulas`.

    images --(extractor)--> features (N, D) [+ class probabilities (N, K)] --(formulas)--> FID, KID, IS, P/R

An extractor is any torch module in eval mode with a ``name``, a ``comparable_to_papers`` flag and two
methods (the :class:`FeatureExtractor` protocol). Real-data features are computed once and saved as a
reference file (safetensors, with JSON metadata in its header), which is refused when reloaded for a
different extractor: numbers from different feature spaces must never be compared.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from difflab.errors import DifflabError
from difflab.metrics.domain import DOMAIN_EXTRACTORS, load_domain_extractor
from difflab.metrics.formulas import feature_stats, fid_from_stats, inception_score, kid, precision_recall
from difflab.metrics.inception import InceptionExtractor


@runtime_checkable
class FeatureExtractor(Protocol):
    """What the metrics need from a network. Extractors are torch modules in eval mode; each one does its
    own preprocessing (resizing, gray -> RGB, value range) and moves inputs to its own device."""

    name: str                   # e.g. "inception-v3-fid", "domain-fashion-mnist"; stored with references
    comparable_to_papers: bool  # True only for the standard FID Inception

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images float in [-1, 1], (N, C, H, W) -> features (N, D)."""
        ...

    def probabilities(self, images: torch.Tensor) -> torch.Tensor | None:
        """Images -> class probabilities (N, K) for the Inception Score, or None if the network has none."""
        ...


class ModuleExtractor(nn.Module):
    """Any torch module mapping images in [-1, 1] to features (N, D) as an extractor (eval mode, no grad).

    `probabilities_fn`, if given, maps the same images to class probabilities (N, K) for the Inception Score.
    Numbers computed with it are comparable only with numbers from the same module.
    """

    comparable_to_papers = False

    def __init__(
        self, module: nn.Module, name: str, *, probabilities_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    ):
        super().__init__()
        if not name:
            raise DifflabError("a feature extractor needs a non-empty name (it is stored with reference statistics)")
        self.module = module.eval().requires_grad_(False)
        self.name = name
        self.probabilities_fn = probabilities_fn

    def train(self, mode: bool = True) -> ModuleExtractor:
        return super().train(False)  # an extractor is a fixed function: always eval

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        parameter = next(self.module.parameters(), None)
        return images if parameter is None else images.to(parameter.device)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        out = self.module(self._to_device(images))
        return out.flatten(1)                                                   # (N, D)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor | None:
        return None if self.probabilities_fn is None else self.probabilities_fn(self._to_device(images))


def _batches(images, batch_size: int) -> Iterable[torch.Tensor]:
    """A tensor (N, C, H, W) split into batches, or an iterable of batches ((x, label) pairs allowed)."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise DifflabError(f"images must be a tensor (N, C, H, W); got shape {tuple(images.shape)}")
        return images.split(batch_size)
    return (batch[0] if isinstance(batch, (tuple, list)) else batch for batch in images)


def compute_features(
    extractor: FeatureExtractor, images, *, batch_size: int = 256, progress: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """Features (N, D) float64 and class probabilities (N, K) float64 or None of all images.

    `images` is a tensor (N, C, H, W) in [-1, 1] or an iterable of such batches (e.g. a DataLoader).
    Extractors with a ``features_and_probabilities`` method get one pass per batch instead of two.
    """
    if batch_size < 1:
        raise DifflabError(f"batch_size must be >= 1; got {batch_size}")
    total = len(images) if isinstance(images, torch.Tensor) else None
    both = getattr(extractor, "features_and_probabilities", None)
    features, probs = [], []
    bar = tqdm(total=total, desc=f"features ({extractor.name})", unit="img", disable=not progress, leave=False)
    with torch.no_grad():
        for batch in _batches(images, batch_size):
            if both is not None:
                f, p = both(batch)
            else:
                f, p = extractor.features(batch), extractor.probabilities(batch)
            features.append(f.detach().double().cpu())
            if p is not None:
                probs.append(p.detach().double().cpu())
            bar.update(len(batch))
    bar.close()
    if not features:
        raise DifflabError("no images to compute features of")
    return torch.cat(features).numpy(), (torch.cat(probs).numpy() if probs else None)


# ------------------------------------------------------------------------------------------------------
# Reference statistics: computed once per (dataset, extractor), reloaded for every evaluation.
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reference:
    """Real-data features and their FID statistics, with the extractor that made them."""

    features: np.ndarray          # (N, D) float64 — KID and precision/recall need the samples themselves
    mu: np.ndarray                # (D,)    float64 — FID
    sigma: np.ndarray             # (D, D)  float64 — FID
    probs: np.ndarray | None      # (N, K)  float64 or None
    extractor_name: str
    info: dict[str, Any]          # free-form: dataset, split, image size, ...


_METADATA_KEY = "difflab_reference"


def save_reference(path, features, probs=None, *, extractor_name: str, info: dict[str, Any] | None = None) -> Reference:
    """Save real-data features (float32), their mean/covariance (float64) and JSON metadata to `path`."""
    features = np.asarray(features, dtype=np.float64)
    mu, sigma = feature_stats(features)
    tensors = {
        "features": torch.from_numpy(features).float(),
        "mu": torch.from_numpy(mu),
        "sigma": torch.from_numpy(np.ascontiguousarray(sigma)),
    }
    if probs is not None:
        tensors["probs"] = torch.from_numpy(np.asarray(probs, dtype=np.float64)).float()
    meta = {"extractor": extractor_name, "count": int(features.shape[0]), "dim": int(features.shape[1]),
            "info": dict(info or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={_METADATA_KEY: json.dumps(meta)})
    stored_probs = tensors.get("probs")
    return Reference(tensors["features"].double().numpy(), mu, sigma,
                     None if stored_probs is None else stored_probs.double().numpy(), extractor_name, meta["info"])


def load_reference(path, *, extractor_name: str | None = None) -> Reference:
    """Load a reference saved by :func:`save_reference`; refuse it if `extractor_name` differs from its own."""
    path = Path(path)
    if not path.is_file():
        raise DifflabError(f"reference statistics not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads(fh.metadata()[_METADATA_KEY])
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError, ValueError, KeyError, TypeError):
        raise DifflabError(f"{path} is not a difflab reference statistics file") from None
    if extractor_name is not None and meta["extractor"] != extractor_name:
        raise DifflabError(
            f"{path} was computed with features '{meta['extractor']}', not '{extractor_name}'; "
            "recompute the reference with the same extractor"
        )
    probs = tensors.get("probs")
    return Reference(
        features=tensors["features"].double().numpy(),
        mu=tensors["mu"].double().numpy(),
        sigma=tensors["sigma"].double().numpy(),
        probs=None if probs is None else probs.double().numpy(),
        extractor_name=meta["extractor"],
        info=meta.get("info", {}),
    )


# ------------------------------------------------------------------------------------------------------
# All the metrics at once.
# ------------------------------------------------------------------------------------------------------
METRICS = ("fid", "kid", "is", "pr")


def evaluate_features(
    real_feats,
    fake_feats,
    *,
    fake_probs=None,
    metrics: Sequence[str] | None = None,
    extractor_name: str | None = None,
    real_stats: tuple[np.ndarray, np.ndarray] | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    is_splits: int = 10,
    pr_k: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """FID, KID, IS and precision/recall of fake features against real features, as a flat dict.

    `metrics` picks from ("fid", "kid", "is", "pr"); by default all of them, IS only when `fake_probs`
    is given. `real_stats` = (mu, sigma) skips recomputing the real statistics (from a :class:`Reference`).
    The KID subset size is clamped to the smaller set; the result then says so under "kid_note".
    """
    if metrics is None:
        metrics = tuple(m for m in METRICS if m != "is" or fake_probs is not None)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise DifflabError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    if "is" in metrics and fake_probs is None:
        raise DifflabError(
            f"the Inception Score needs class probabilities, which the extractor '{extractor_name or '?'}' "
            "does not give; leave out 'is'"
        )
    real = np.asarray(real_feats, dtype=np.float64)
    fake = np.asarray(fake_feats, dtype=np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise DifflabError(f"real and fake features must be (N, D) with the same D; got {real.shape} and {fake.shape}")

    result: dict[str, Any] = {"features": extractor_name, "n_real": len(real), "n_fake": len(fake)}
    if "fid" in metrics:
        mu_r, sigma_r = real_stats if real_stats is not None else feature_stats(real)
        mu_f, sigma_f = feature_stats(fake)
        result["fid"] = fid_from_stats(mu_f, sigma_f, mu_r, sigma_r)
    if "kid" in metrics:
        size = min(kid_subset_size, len(real), len(fake))
        result["kid_mean"], result["kid_std"] = kid(real, fake, subsets=kid_subsets, subset_size=size, seed=seed)
        result["kid_subset_size"] = size
        if size < kid_subset_size:
            result["kid_note"] = f"subset size clamped from {kid_subset_size} to {size} (the smaller set)"
    if "is" in metrics:
        result["is_mean"], result["is_std"] = inception_score(fake_probs, splits=min(is_splits, len(fake)))
    if "pr" in metrics:
        result["precision"], result["recall"] = precision_recall(real, fake, k=pr_k)
    return result


def get_extractor(
    name: str, *, device: str | torch.device = "cpu", inception_weights: str | None = None
) -> FeatureExtractor:
    """The extractor called `name`: "inception" (the FID Inception-v3) or a dataset with a shipped domain classifier."""
    if name == "inception":
        return InceptionExtractor(inception_weights, device=device)
    if name in DOMAIN_EXTRACTORS:
        return load_domain_extractor(name, device=device)
    choices = ", ".join(("inception", *DOMAIN_EXTRACTORS))
    raise DifflabError(f"unknown feature extractor {name!r}; choose from {choices}")
