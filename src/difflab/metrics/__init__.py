"""Sample-quality metrics: feature extractors (the FID Inception-v3, domain classifiers, any module) and
FID / KID / Inception Score / improved precision–recall computed from their features.

    extractor = get_extractor("inception")                       # or a dataset name, or ModuleExtractor(...)
    real, _ = compute_features(extractor, real_images)
    fake, fake_probs = compute_features(extractor, fake_images)
    evaluate_features(real, fake, fake_probs=fake_probs, extractor_name=extractor.name)
"""

from difflab.metrics.features import (
    METRICS,
    FeatureExtractor,
    ModuleExtractor,
    Reference,
    compute_features,
    evaluate_features,
    get_extractor,
    load_reference,
    save_reference,
)
from difflab.metrics.formulas import feature_stats, fid_from_stats, inception_score, kid, precision_recall
from difflab.metrics.inception import FIDInceptionV3, InceptionExtractor

__all__ = [
    "METRICS",
    "FeatureExtractor",
    "FIDInceptionV3",
    "InceptionExtractor",
    "ModuleExtractor",
    "Reference",
    "compute_features",
    "evaluate_features",
    "feature_stats",
    "fid_from_stats",
    "get_extractor",
    "inception_score",
    "kid",
    "load_reference",
    "precision_recall",
    "save_reference",
]

# Reconstruction metrics (issue 12): per-image PSNR and SSIM for autoencoders.
from difflab.metrics.reconstruction import psnr, ssim  # noqa: E402

__all__ += ["psnr", "ssim"]
