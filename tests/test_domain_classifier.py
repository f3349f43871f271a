"""The shipped domain classifiers (difflab.metrics.domain): accuracy as stored, the extractor protocol,
preprocessing, configs, and safetensors-only assets. No training here: the weights come from the package."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch
from safetensors import safe_open

from difflab.data import to_model_range
from difflab.errors import DifflabError
from difflab.metrics.domain import DOMAIN_EXTRACTORS, load_domain_extractor, load_domain_split
from difflab.nn.domain_classifier import DomainClassifier, DomainClassifierConfig

ASSETS = resources.files("difflab") / "assets"
MIN_ACCURACY = {"fashion-mnist": 0.90, "digits": 0.97}


@pytest.fixture(scope="module", params=DOMAIN_EXTRACTORS)
def shipped(request):
    """(dataset, extractor, held-out images in [-1, 1], labels, stored JSON)."""
    dataset = request.param
    try:
        test = load_domain_split(dataset, "test")
    except DifflabError as e:  # Fashion-MNIST files not installed on this machine
        pytest.skip(str(e))
    meta = json.loads((ASSETS / f"classifier-{dataset}.json").read_text())
    return dataset, load_domain_extractor(dataset), to_model_range(test.images), test.labels, meta


def test_held_out_accuracy_matches_the_stored_number(shipped):
    dataset, extractor, x, labels, meta = shipped
    accuracy = float((extractor.predict(x) == labels).float().mean())
    assert meta["test_images"] == len(labels)
    assert abs(accuracy - meta["test_accuracy"]) <= 0.01, (accuracy, meta["test_accuracy"])
    assert extractor.test_accuracy == meta["test_accuracy"]
    assert accuracy >= MIN_ACCURACY[dataset]


def test_protocol_shapes_determinism_and_probabilities(shipped):
    dataset, extractor, x, _, meta = shipped
    assert isinstance(extractor, torch.nn.Module)
    assert extractor.name == f"domain-{dataset}" and extractor.comparable_to_papers is False
    assert extractor.class_names == meta["class_names"] and len(extractor.class_names) == extractor.num_classes
    batch = x[:64]
    feats = extractor.features(batch)
    assert feats.shape == (64, extractor.feature_dim) == (64, 128) and feats.dtype == torch.float32
    assert torch.equal(feats, extractor.features(batch))                      # deterministic
    assert torch.allclose(extractor.features(batch[:5]), feats[:5], atol=1e-5)  # independent of the batch
    assert (feats >= 0).all()                                                 # after the ReLU
    probs = extractor.probabilities(batch)
    assert probs.shape == (64, extractor.num_classes) and probs.dtype == torch.float32
    assert torch.allclose(probs.sum(1), torch.ones(64), atol=1e-5) and (probs >= 0).all()
    assert torch.equal(extractor.predict(batch), probs.argmax(1))
    assert extractor.predict(batch).shape == (64,)
    both = extractor.features_and_probabilities(batch)  # the one-pass form difflab.metrics uses
    assert torch.allclose(both[0], feats, atol=1e-6) and torch.allclose(both[1], probs, atol=1e-6)


def test_rgb_and_resized_inputs(shipped):
    _, extractor, x, labels, _ = shipped
    x, labels = x[:300], labels[:300]
    gray = extractor.features(x)
    rgb = x.expand(-1, 3, -1, -1)           # a grey RGB image has luminance equal to its value
    assert torch.allclose(extractor.features(rgb), gray, atol=1e-4)
    big = torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    assert extractor.features(big).shape == gray.shape
    agree = float((extractor.predict(big) == labels).float().mean())
    assert agree >= 0.8, agree               # resized back down, the images are still recognised


def test_extractor_stays_frozen(shipped):
    _, extractor, x, _, _ = shipped
    before = {k: v.clone() for k, v in extractor.state_dict().items()}
    extractor.train()
    assert not extractor.training and not extractor.model.training
    extractor.features(x[:32] * 0.5)
    assert all(torch.equal(before[k], v) for k, v in extractor.state_dict().items())
    assert not any(p.requires_grad for p in extractor.parameters())


def test_bad_inputs_and_unknown_datasets_raise_one_line_errors():
    extractor = load_domain_extractor("Digits", device="cpu")  # names are normalised
    for bad in (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.zeros(2, 2, 8, 8), torch.zeros(8, 8)):
        with pytest.raises(DifflabError):
            extractor.features(bad)
    for name in ("cifar10", "mnist", "imagenet"):
        with pytest.raises(DifflabError) as e:
            load_domain_extractor(name)
        message = str(e.value)
        assert "\n" not in message and "fashion-mnist" in message and "digits" in message and "MNIST" in message
    assert load_domain_extractor("fashion_mnist").name == "domain-fashion-mnist"


def test_config_round_trips_through_json():
    config = DomainClassifierConfig(image_size=16, in_channels=3, num_classes=7, channels=(8, 16), blocks=(1, 2),
                              feature_dim=32, dropout=0.2)
    again = DomainClassifierConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.channels == (8, 16)
    model = DomainClassifier(again)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    assert model.features(x).shape == (3, 32) and model(x).shape == (3, 7)
    for bad in (dict(image_size=0), dict(image_size=8, channels=(8, 16), blocks=(1,)),
                dict(image_size=2, channels=(4, 4, 4), blocks=(1, 1, 1)), dict(image_size=8, dropout=1.0)):
        with pytest.raises(DifflabError):
            DomainClassifierConfig(**bad)
    with pytest.raises(DifflabError):
        DomainClassifierConfig.from_dict({"image_size": 8, "kernel": 5})


@pytest.mark.parametrize("dataset", DOMAIN_EXTRACTORS)
def test_assets_are_safetensors_and_json_only(dataset):
    files = sorted(p.name for p in ASSETS.iterdir() if p.name.startswith(f"classifier-{dataset}."))
    assert files == [f"classifier-{dataset}.json", f"classifier-{dataset}.safetensors"]
    weights = ASSETS / f"classifier-{dataset}.safetensors"
    raw = weights.read_bytes()
    assert len(raw) < 1_000_000
    assert not raw.startswith((b"PK", b"\x80"))  # neither a torch zip archive nor a raw pickle
    meta = json.loads((ASSETS / f"classifier-{dataset}.json").read_text())
    config = DomainClassifierConfig.from_dict(meta["config"])
    expected = DomainClassifier(config).state_dict()
    with safe_open(str(weights), framework="pt") as f:
        assert set(f.keys()) == set(expected)
        assert all(f.get_slice(k).get_shape() == list(expected[k].shape) for k in expected)
    assert meta["comparable_to_papers"] is False and meta["dataset"] == dataset
    assert {"epochs", "seed", "date", "data_source"} <= set(meta["training"])
