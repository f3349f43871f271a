"""Sample-quality metrics computed from features: FID, KID, Inception Score, precision and recall.

Every function here takes feature arrays (numpy or torch, shape (N, D)) or class probabilities (N, K)
and does its arithmetic in float64. Which network produced the features is not their business
(see :mod:`difflab.metrics.features`): the same formulas serve the FID Inception and a domain classifier.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch

from difflab.errors import DifflabError


def _as_float64(x, what: str) -> np.ndarray:
    """A (N, D) float64 numpy copy of a numpy array or torch tensor, or a one-line error."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise DifflabError(f"{what} must be a 2-D array (N, D); got shape {tuple(x.shape)}")
    if not np.all(np.isfinite(x)):
        raise DifflabError(f"{what} contains NaN or infinite values")
    return x


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D): the Gaussian FID fits to each set."""
    f = _as_float64(features, "features")
    if f.shape[0] < 2:
        raise DifflabError(f"feature statistics need at least 2 samples; got {f.shape[0]}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


# ---------------------------------------------------------------------------------------------------------
# FID — Heusel et al. 2017, "GANs trained by a two time-scale update rule ...", eq. (6):
#   d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})
# (S1 S2)^{1/2} is computed with scipy.linalg.sqrtm. S1 S2 is similar to the PSD matrix
# S1^{1/2} S2 S1^{1/2}, so its square root has real, non-negative eigenvalues; round-off leaves tiny
# imaginary parts, which are dropped. A singular product (fewer samples than dimensions) can make sqrtm
# fail; then eps * I is added to both covariances, as in the reference TF/pytorch-fid code.
# ---------------------------------------------------------------------------------------------------------
def fid_from_stats(mu1, sigma1, mu2, sigma2, *, eps: float = 1e-6) -> float:
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise DifflabError(
            f"FID statistics do not match: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}"
        )
    diff = mu1 - mu2

    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(covmean)):
        offset = np.eye(d) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Imaginary parts are round-off only when they are small next to the matrix itself.
        tolerance = 1e-3 * max(1.0, float(np.abs(covmean.real).max()))
        largest = float(np.abs(covmean.imag).max())
        if largest > tolerance:
            raise DifflabError(
                f"FID: sqrt(S1 S2) has imaginary parts up to {largest:.3g}; the covariances are ill-conditioned "
                "(use more samples than feature dimensions)"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


# ---------------------------------------------------------------------------------------------------------
# KID — Bińkowski et al. 2018, "Demystifying MMD GANs", §3 and Appendix D: the unbiased estimator of the
# squared MMD with the cubic polynomial kernel k(x, y) = (x·y / d + 1)^3, averaged over random subsets:
#   MMD^2_u = 1/(m(m-1)) sum_{i!=j} [k(x_i,x_j) + k(y_i,y_j)] - 2/m^2 sum_{i,j} k(x_i,y_j)
# The same estimator (and population std over subsets) as torchmetrics' KernelInceptionDistance and
# torch-fidelity's KID.
# ---------------------------------------------------------------------------------------------------------
def _polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between two equal-size sets x, y (m, D) under k(a, b) = (a·b / D + 1)^3."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / m**2)


def kid(f_real, f_fake, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: (mean, std) of the unbiased MMD^2 over `subsets` random subsets.

    Each subset draws `subset_size` samples without replacement from each set (numpy generator seeded
    with `seed`). The subset size must not exceed either set; callers that want it clamped do so
    themselves (:func:`difflab.metrics.features.evaluate_features` does, and says so in its result).
    """
    x, y = _as_float64(f_real, "real features"), _as_float64(f_fake, "fake features")
    if x.shape[1] != y.shape[1]:
        raise DifflabError(f"KID: feature sizes differ (real {x.shape[1]}, fake {y.shape[1]})")
    if subsets < 1:
        raise DifflabError(f"KID: subsets must be >= 1; got {subsets}")
    if not 2 <= subset_size <= min(len(x), len(y)):
        raise DifflabError(
            f"KID: subset_size must be between 2 and the smaller set size {min(len(x), len(y))}; got {subset_size}"
        )
    rng = np.random.default_rng(seed)
    scores = [
        _polynomial_mmd2_unbiased(
            x[rng.choice(len(x), subset_size, replace=False)], y[rng.choice(len(y), subset_size, replace=False)]
        )
        for _ in range(subsets)
    ]
    return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------------------------------------------------
# Inception Score — Salimans et al. 2016, "Improved techniques for training GANs", §4:
#   IS = exp( E_x KL( p(y|x) || p(y) ) ),  p(y) = E_x p(y|x)
# computed on `splits` consecutive equal parts of the samples (no shuffling); (mean, std) over the parts.
# ---------------------------------------------------------------------------------------------------------
def inception_score(probs, *, splits: int = 10) -> tuple[float, float]:
    """Inception Score of class probabilities (N, K): (mean, population std) over `splits` parts."""
    p = _as_float64(probs, "class probabilities")
    if splits < 1 or splits > len(p):
        raise DifflabError(f"Inception Score: splits must be between 1 and the sample count {len(p)}; got {splits}")
    if np.any(p < 0) or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise DifflabError("Inception Score needs class probabilities: non-negative rows that sum to 1")
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(axis=0, keepdims=True)                                        # p(y)   (1, K)
        # p log(p / p(y)) with 0 log 0 = 0: classes a sample never predicts contribute nothing.
        kl = np.where(part > 0, part * (np.log(np.where(part > 0, part, 1.0)) - np.log(marginal)), 0.0)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------------------------------------------------
# Improved precision and recall — Kynkäänniemi et al. 2019, "Improved precision and recall metric for
# assessing generative models", eq. (1)-(2): each set's manifold is the union of balls around its samples,
# the radius of a ball being the distance to the sample's k-th nearest neighbour in its own set.
#   precision = share of fake samples inside the real manifold
#   recall    = share of real samples inside the fake manifold
# Distances are computed in row chunks with torch.cdist so 10k x 10k sets stay within ~100 MB.
# ---------------------------------------------------------------------------------------------------------
_CHUNK_ELEMENTS = 1 << 23  # distances held at once (8M float64 = 64 MB)


def _rows_per_chunk(n_columns: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, n_columns))


def knn_radii(f: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row of f (N, D) to its k-th nearest other row: (N,)."""
    rows = _rows_per_chunk(len(f))
    radii = []
    for start in range(0, len(f), rows):
        dist = torch.cdist(f[start : start + rows], f)                                   # (rows, N)
        # The k+1 smallest include the sample itself at distance 0.
        radii.append(dist.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def _share_inside(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Share of queries within radii[j] of some centres[j]."""
    rows = _rows_per_chunk(len(centres))
    inside = 0
    for start in range(0, len(queries), rows):
        dist = torch.cdist(queries[start : start + rows], centres)                       # (rows, M)
        inside += int((dist <= radii[None, :]).any(dim=1).sum())
    return inside / len(queries)


def precision_recall(f_real, f_fake, *, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall of fake features against real features, with k-NN balls."""
    x = torch.from_numpy(_as_float64(f_real, "real features"))
    y = torch.from_numpy(_as_float64(f_fake, "fake features"))
    if x.shape[1] != y.shape[1]:
        raise DifflabError(f"precision/recall: feature sizes differ (real {x.shape[1]}, fake {y.shape[1]})")
    if not 1 <= k < min(len(x), len(y)):
        raise DifflabError(f"precision/recall: k must be between 1 and the smaller set size - 1; got {k}")
    precision = _share_inside(y, x, knn_radii(x, k))
    recall = _share_inside(x, y, knn_radii(y, k))
    return precision, recall
