"""Metrics: exact answers for the formulas, cross-checks against torchmetrics and brute force, the
reference-statistics file, extractors, and the FID Inception (its architecture checked against values
computed with torch-fidelity's FeatureExtractorInceptionV3 on the same deterministic weights)."""

import math
import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from difflab.errors import DifflabError
from difflab.metrics import (
    FIDInceptionV3,
    InceptionExtractor,
    ModuleExtractor,
    compute_features,
    evaluate_features,
    feature_stats,
    fid_from_stats,
    formulas,
    get_extractor,
    inception,
    inception_score,
    kid,
    load_reference,
    precision_recall,
    save_reference,
)


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and message
    return message


# ------------------------------------------------------------------------------------------- FID
def test_fid_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    assert fid_from_stats(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0.0, abs=1e-10)


def test_fid_commuting_covariances_closed_form():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute, so Tr (S1 S2)^{1/2} = sum sqrt(a_i b_i).
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    a, b = rng.uniform(0.2, 4, size=5), rng.uniform(0.2, 4, size=5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = fid_from_stats(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-8)


def test_fid_of_sample_statistics_converges_to_closed_form():
    rng = np.random.default_rng(2)
    d = 4
    a, b = np.array([1.0, 2.0, 0.5, 3.0]), np.array([2.0, 1.0, 1.0, 0.25])
    mu2 = np.full(d, 0.5)
    expected = d * 0.25 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    errors = []
    for n in (1_000, 100_000):
        x = rng.normal(size=(n, d)) * np.sqrt(a)
        y = rng.normal(size=(n, d)) * np.sqrt(b) + mu2
        errors.append(abs(fid_from_stats(*feature_stats(x), *feature_stats(y)) - expected))
    assert errors[1] < 0.02 * expected
    assert errors[1] < errors[0]


def test_fid_singular_covariances_fewer_samples_than_dimensions():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(10, 32)), rng.normal(size=(10, 32)) + 1.0
    value = fid_from_stats(*feature_stats(x), *feature_stats(y))
    assert np.isfinite(value) and value > 0
    with pytest.raises(DifflabError) as err:
        fid_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    _one_line(err)


class _FeaturesAsImages(nn.Module):
    """torchmetrics' custom-feature path: the 'images' we update it with are already the features."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x):
        return x


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save all extracted features")
def test_fid_and_kid_agree_with_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    rng = np.random.default_rng(4)
    d, n_real, n_fake = 16, 300, 300
    real = rng.normal(size=(n_real, d)) @ rng.normal(size=(d, d)) * 0.3
    fake = rng.normal(size=(n_fake, d)) @ rng.normal(size=(d, d)) * 0.3 + 0.2
    real_t, fake_t = torch.from_numpy(real), torch.from_numpy(fake)

    fid_tm = FrechetInceptionDistance(feature=_FeaturesAsImages(d))
    fid_tm.update(real_t, real=True)
    fid_tm.update(fake_t, real=False)
    ours = fid_from_stats(*feature_stats(fake), *feature_stats(real))
    assert ours == pytest.approx(float(fid_tm.compute()), rel=1e-3)

    # One subset of all samples: the unbiased full-set MMD^2, independent of either library's subset RNG.
    kid_tm = KernelInceptionDistance(feature=_FeaturesAsImages(d), subsets=1, subset_size=n_real)
    kid_tm.update(real_t, real=True)
    kid_tm.update(fake_t, real=False)
    mean_tm, _ = kid_tm.compute()
    mean, std = kid(real, fake, subsets=1, subset_size=n_real)
    assert mean == pytest.approx(float(mean_tm), rel=1e-3)
    assert std == 0.0


def test_kid_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(5)
    x, y, z = rng.normal(size=(400, 8)), rng.normal(size=(400, 8)), rng.normal(size=(400, 8)) + 1.0
    same, _ = kid(x, y, subsets=20, subset_size=200)
    different, _ = kid(x, z, subsets=20, subset_size=200)
    assert abs(same) < 0.05 * different
    with pytest.raises(DifflabError) as err:
        kid(x, y, subset_size=401)
    _one_line(err)


# ------------------------------------------------------------------------------------------- IS
def test_inception_score_uniform_is_one_and_confident_balanced_is_k():
    k = 7
    assert inception_score(np.full((70, k), 1 / k), splits=5) == pytest.approx((1.0, 0.0), abs=1e-12)
    one_hot = np.eye(k)[np.tile(np.arange(k), 10)]                 # 70 samples, 10 of each class
    mean, std = inception_score(one_hot, splits=10)                 # every split holds each class once
    assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    assert inception_score(one_hot, splits=1)[0] == pytest.approx(k, rel=1e-12)


# ------------------------------------------------------------------------------------------- P/R
def _brute_force_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019 eq. (1)-(2) with plain loops."""

    def radius(points, i):
        dists = sorted(np.linalg.norm(points[i] - points[j]) for j in range(len(points)) if j != i)
        return dists[k - 1]

    def share_inside(queries, centres):
        radii = [radius(centres, j) for j in range(len(centres))]
        hits = [any(np.linalg.norm(q - c) <= r for c, r in zip(centres, radii)) for q in queries]
        return sum(hits) / len(queries)

    return share_inside(fake, real), share_inside(real, fake)


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_matches_brute_force(k, monkeypatch):
    rng = np.random.default_rng(6)
    real = rng.normal(size=(40, 5))
    fake = rng.normal(size=(50, 5)) * 1.3 + 0.4
    expected = _brute_force_precision_recall(real, fake, k)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert precision_recall(real, fake, k=k) == pytest.approx(expected, abs=1e-12)
    monkeypatch.setattr(formulas, "_CHUNK_ELEMENTS", 7 * 50)        # many small chunks: same answer
    assert precision_recall(real, fake, k=k) == pytest.approx(expected, abs=1e-12)


def test_precision_recall_identical_and_disjoint_sets():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(100, 6))
    assert precision_recall(x, x.copy(), k=3) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)


# ------------------------------------------------------------------------------------------- extractors
class _TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.bn(self.conv(x)).relu().mean(dim=(2, 3))    # (N, 4)


def _tiny_extractor() -> ModuleExtractor:
    torch.manual_seed(0)
    net = _TinyNet().train()
    return ModuleExtractor(net, "tiny", probabilities_fn=lambda x: net.head(net(x)).softmax(dim=1))


def test_module_extractor_with_a_tiny_conv_net():
    extractor = _tiny_extractor()
    assert not extractor.module.training and not extractor.train().training
    images = torch.rand(10, 1, 8, 8) * 2 - 1
    feats, probs = compute_features(extractor, images, batch_size=3, progress=False)
    assert feats.dtype == np.float64 and feats.shape == (10, 4) and probs.shape == (10, 3)
    batches = [(images[i : i + 4], torch.zeros(4)) for i in range(0, 10, 4)]   # a loader of (x, label)
    feats2, probs2 = compute_features(extractor, batches, progress=False)
    np.testing.assert_allclose(feats2, feats, rtol=1e-6)
    np.testing.assert_allclose(probs2, probs, rtol=1e-6)
    assert compute_features(ModuleExtractor(_TinyNet(), "p"), images, progress=False)[1] is None


def test_evaluate_features_all_metrics_and_errors():
    rng = np.random.default_rng(8)
    real, fake = rng.normal(size=(60, 4)), rng.normal(size=(50, 4)) + 0.5
    probs = rng.dirichlet(np.ones(3), size=50)
    out = evaluate_features(real, fake, fake_probs=probs, extractor_name="tiny", kid_subsets=5)
    assert out["features"] == "tiny" and (out["n_real"], out["n_fake"]) == (60, 50)
    assert out["fid"] == pytest.approx(fid_from_stats(*feature_stats(fake), *feature_stats(real)))
    assert out["kid_subset_size"] == 50 and "clamped" in out["kid_note"]
    assert (out["is_mean"], out["is_std"]) == inception_score(probs, splits=10)
    assert (out["precision"], out["recall"]) == precision_recall(real, fake, k=3)
    assert "is_mean" not in evaluate_features(real, fake, metrics=None)
    with pytest.raises(DifflabError) as err:
        evaluate_features(real, fake, metrics=("fid", "swd"))
    assert "swd" in _one_line(err)
    with pytest.raises(DifflabError) as err:
        evaluate_features(real, fake, metrics=("is",), extractor_name="tiny")
    assert "probabilities" in _one_line(err)


def test_reference_round_trip_and_mismatched_extractor(tmp_path):
    rng = np.random.default_rng(9)
    feats, probs = rng.normal(size=(30, 5)), rng.dirichlet(np.ones(4), size=30)
    path = tmp_path / "refs" / "digits.safetensors"
    saved = save_reference(path, feats, probs, extractor_name="tiny", info={"dataset": "digits", "split": "train"})
    ref = load_reference(path, extractor_name="tiny")
    np.testing.assert_array_equal(saved.features, ref.features)
    np.testing.assert_array_equal(saved.sigma, ref.sigma)
    np.testing.assert_allclose(ref.features, feats, rtol=1e-6)          # stored as float32
    np.testing.assert_allclose(ref.probs, probs, rtol=1e-6)
    mu, sigma = feature_stats(feats)
    np.testing.assert_allclose(ref.mu, mu, rtol=1e-12)                  # statistics kept in float64
    np.testing.assert_allclose(ref.sigma, sigma, rtol=1e-12)
    assert ref.extractor_name == "tiny" and ref.info == {"dataset": "digits", "split": "train"}
    with pytest.raises(DifflabError) as err:
        load_reference(path, extractor_name="inception-v3-fid")
    assert "tiny" in _one_line(err)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    for bad in (tmp_path / "junk.safetensors", tmp_path / "missing.safetensors"):
        with pytest.raises(DifflabError) as err:
            load_reference(bad)
        _one_line(err)


def test_get_extractor_unknown_name_lists_choices():
    with pytest.raises(DifflabError) as err:
        get_extractor("vgg")
    assert "inception" in _one_line(err)


# ------------------------------------------------------------------------------------------- Inception
def test_missing_inception_weights_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    for make in (lambda: InceptionExtractor(), lambda: get_extractor("inception")):
        with pytest.raises(DifflabError) as err:
            make()
        message = _one_line(err)
        assert inception.WEIGHTS_URL in message and "--inception-weights PATH" in message
    with pytest.raises(DifflabError) as err:
        InceptionExtractor(tmp_path / "nope.pth")
    _one_line(err)
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(DifflabError) as err:
        InceptionExtractor(tmp_path / "other.pth")
    assert inception.WEIGHTS_FILE in _one_line(err)


def test_resize_is_tensorflow1_bilinear():
    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).reshape(2, 3, 5, 7) ** 1.5
    out = inception.resize_bilinear_tf1(x, 11)
    assert out.shape == (2, 3, 11, 11)
    # TF1 align_corners=False: output i samples the input at i * in / out, no half-pixel offset.
    for i in (0, 4, 10):
        for j in (0, 3, 10):
            y, xx = i * 5 / 11, j * 7 / 11
            y0, x0 = math.floor(y), math.floor(xx)
            y1, x1 = min(y0 + 1, 4), min(x0 + 1, 6)
            top = x[..., y0, x0] + (x[..., y0, x1] - x[..., y0, x0]) * (xx - x0)
            bottom = x[..., y1, x0] + (x[..., y1, x1] - x[..., y1, x0]) * (xx - x0)
            torch.testing.assert_close(out[..., i, j], top + (bottom - top) * (y - y0), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(inception.resize_bilinear_tf1(torch.full((1, 1, 28, 28), 3.0), 299),
                               torch.full((1, 1, 299, 299), 3.0))


def test_inception_preprocessing_range_size_and_channels():
    gray = torch.rand(2, 1, 28, 28) * 2 - 1
    x = inception.preprocess(gray)
    assert x.shape == (2, 3, 299, 299)
    torch.testing.assert_close(x, inception.preprocess(gray.repeat(1, 3, 1, 1)))
    torch.testing.assert_close(x[:, 0], x[:, 2])
    ends = inception.preprocess(torch.tensor([-1.0, 1.0]).view(1, 1, 1, 2).expand(1, 3, 299, 2).contiguous())
    assert ends.shape == (1, 3, 299, 299)
    assert ends.min() == -1.0 and ends.max() == 127 / 128                # 8-bit 0..255 -> (v - 128) / 128
    with pytest.raises(DifflabError) as err:
        inception.preprocess(torch.zeros(2, 2, 8, 8))
    _one_line(err)


def _deterministic_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """Weights from a closed form (no RNG), so the stored values below do not depend on torch's RNG."""
    state = {}
    for i, (key, value) in enumerate(net.state_dict().items()):
        if value.dtype != torch.float32:
            state[key] = value.clone()
            continue
        t = torch.sin(torch.arange(value.numel(), dtype=torch.float64) * 0.731 + i)
        if key.endswith("running_var"):
            t = 1.0 + 0.5 * t
        elif key.endswith("running_mean") or key.endswith("bias"):
            t = 0.1 * t
        elif key.endswith("bn.weight"):
            t = 1.0 + 0.2 * t
        else:
            t = t * 2.0 / math.sqrt(value[0].numel())
        state[key] = t.reshape(value.shape).float()
    return state


@pytest.fixture(scope="module")
def untrained_inception(tmp_path_factory) -> InceptionExtractor:
    """The extractor loading a weight file of the right layout but made-up values (no download needed).

    One intra-op thread while it is used: on a busy 2-core machine, OpenMP threads spinning against other
    processes make an Inception pass 25x slower (7 s instead of 0.3 s per image)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("inception") / "deterministic.pth"
    torch.save(_deterministic_state(FIDInceptionV3()), path)
    yield InceptionExtractor(path)
    torch.set_num_threads(threads)


def test_inception_extractor_eval_deterministic_and_shapes(untrained_inception):
    extractor = untrained_inception
    assert extractor.name == "inception-v3-fid" and extractor.comparable_to_papers
    assert not any(m.training for m in extractor.train().modules())
    assert not any(p.requires_grad for p in extractor.parameters())
    images = torch.rand(2, 1, 28, 28) * 2 - 1                           # gray, small: repeated and resized
    feats, probs = extractor.features_and_probabilities(images)
    assert feats.shape == (2, 2048) and probs.shape == (2, 1008)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2))
    assert torch.equal(extractor.features(images), feats)               # same input, same features
    f64, p64 = compute_features(extractor, images, batch_size=1, progress=False)   # one image at a time
    np.testing.assert_allclose(f64, feats.double().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(p64, probs.double().numpy(), rtol=1e-4, atol=1e-7)


def test_inception_matches_torch_fidelity_stored_values(untrained_inception):
    # Computed with torch-fidelity 0.4.0's FeatureExtractorInceptionV3 (features "2048", "logits_unbiased")
    # given the same deterministic weights and the 8-bit image; difflab's network agreed to the last bit.
    i = torch.arange(2 * 3 * 40 * 40, dtype=torch.float64).reshape(2, 3, 40, 40)
    images = (torch.sin(i * 0.0173) * torch.cos(i * 0.0041)).float()
    feats, probs = untrained_inception.features_and_probabilities(images)
    expected_feats = [[0.0, 5.559762954711914, 6.529007911682129, 0.0, 0.0, 5.948737144470215],
                      [0.0, 5.682741641998291, 6.595941066741943, 0.0, 0.0, 6.049820899963379]]
    expected_logits = torch.tensor([[-15.337114334106445, 11.693026542663574, 12.55839729309082, -14.677386283874512],
                                    [-15.509233474731445, 11.784085273742676, 12.708885192871094, -14.804205894470215]])
    torch.testing.assert_close(feats[:, :6], torch.tensor(expected_feats), rtol=1e-3, atol=1e-3)
    expected_means = torch.tensor([1.3765517473220825, 1.3900216817855835])
    torch.testing.assert_close(feats.mean(dim=1), expected_means, rtol=1e-3, atol=0)
    log_probs = probs[:, :4].double().log()                              # logits up to a per-row constant
    torch.testing.assert_close(log_probs - log_probs[:, :1], (expected_logits - expected_logits[:, :1]).double(),
                               rtol=1e-3, atol=1e-2)
    expected_max_probs = torch.tensor([0.010610958561301231, 0.010665715672075748])
    torch.testing.assert_close(probs.max(dim=1).values, expected_max_probs, rtol=1e-3, atol=0)


def test_inception_with_the_real_weights():
    path = os.environ.get("DIFFLAB_INCEPTION_WEIGHTS") or inception.cached_weights_path()
    if not Path(path).is_file():
        pytest.skip(f"FID Inception weights not present ({inception.WEIGHTS_FILE}; set DIFFLAB_INCEPTION_WEIGHTS)")
    extractor = get_extractor("inception", inception_weights=str(path))
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    feats, probs = extractor.features_and_probabilities(images)
    assert feats.shape == (4, 2048) and bool((feats >= 0).all())        # pool3 averages ReLU outputs
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(4))
    assert torch.equal(extractor.features(images), feats)
