"""EDM training (Karras et al. 2022) end to end on the bundled digits: the new objective goes through the same loop,
and every sampler, guidance wrapper, `difflab sample` and `difflab eval` work on it unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import difflab
from difflab.cli import main
from difflab.data import load_dataset, to_model_range
from difflab.denoisers import EDMParameterization
from difflab.errors import DifflabError
from difflab.evaluation import evaluate
from difflab.samplers import SAMPLERS

FAST = dict(batch_size=64, log_every=10, sample_every=0, checkpoint_every=1000, num_samples=10, sample_steps=4,
            progress=False, model={"base_channels": 16})


@pytest.fixture(scope="module")
def edm_run(tmp_path_factory):
    """150 steps of a class-conditional EDM model on the digits (about 10 s on 2 cores)."""
    out = tmp_path_factory.mktemp("edm")
    return difflab.train(parameterization="edm", conditional=True, steps=150, out=str(out), name="edm", **FAST)


def test_sigma_data_is_measured_on_the_training_images_and_stored(edm_run):
    pixels = to_model_range(load_dataset("digits").images).double()
    expected = pixels.std(unbiased=False).item()  # the standard deviation over every image and pixel
    saved = json.loads((edm_run / "config.json").read_text())["diffusion"]
    assert saved["parameterization"] == "edm" and saved["sigma_data"] == pytest.approx(expected, abs=1e-6)
    model = difflab.load(edm_run, device="cpu")
    assert isinstance(model.parameterization, EDMParameterization)
    assert model.parameterization.sigma_data == saved["sigma_data"]


def test_it_learns(edm_run):
    rows = [json.loads(r) for r in (edm_run / "log.jsonl").read_text().splitlines()]
    # an untrained EDM denoiser has loss ~1 (its unit-variance target); the floor is far above 0 for data this varied
    assert rows[0]["loss"] > 0.8 and rows[-1]["loss"] < 0.7 * rows[0]["loss"], (rows[0]["loss"], rows[-1]["loss"])
    grid = (edm_run / "samples.png")
    assert grid.is_file()


def test_default_sampling_is_heun_on_18_karras_steps(edm_run, tmp_path, capsys):
    assert main(["sample", str(edm_run), "--class", "3", "-n", "2", "--out", str(tmp_path), "--quiet"]) == 0
    assert "35 network evaluations (NFE) each" in capsys.readouterr().out
    assert (tmp_path / "heun_18steps_seed0_class3_cfg3.0.png").is_file()
    assert main(["sample", str(edm_run), "--spacing", "uniform", "-n", "1"]) == 2
    assert "continuous noise levels" in capsys.readouterr().err


def test_every_sampler_and_guidance_work_on_an_edm_model(edm_run):
    model = difflab.load(edm_run, device="cpu")
    labels = torch.arange(3)
    for name, info in SAMPLERS.items():
        stats = {}
        images = difflab.generate(model, 3, sampler=name, steps=4, cond=labels, guidance_scale=2.0, stats=stats)
        assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all() and images.abs().max() <= 1, name
        assert info.nfe is None or stats["nfe"] == info.nfe(4), name
    images = difflab.sample(model, 2, classes="all", guidance_scale=3.0, guidance_rescale=0.5, steps=5)
    assert images.shape == (20, 1, 8, 8)
    # a noise-aware classifier trained on the VP schedule guides the EDM model too: it sees sigma, not timesteps
    clf = difflab.load_classifier(difflab.train_classifier(steps=3, batch_size=16, out=str(edm_run.parent / "c"),
                                                           progress=False, model={"base_channels": 16}))
    images = difflab.generate(model, 4, cond=torch.tensor([0, 1, 2, 3]), classifier=clf, classifier_scale=2.0, steps=4)
    assert torch.isfinite(images).all()


def test_eval_works_on_an_edm_model(edm_run):
    result = evaluate("digits", str(edm_run), n=64, metrics=("fid", "pr"), steps=4, progress=False)
    assert result["fake"]["nfe"] == 7 and result["fid"] > 0  # Heun, 4 steps: 2 * 4 - 1


def test_edm_resumes_bit_identically(tmp_path):
    common = dict(FAST, parameterization="edm", out=str(tmp_path), checkpoint_every=4, hflip=True,
                  model={"base_channels": 16, "dropout": 0.2})
    straight = difflab.train(steps=8, name="straight", **common)
    half = difflab.train(steps=4, name="half", **common)
    difflab.train(resume=half, steps=8, progress=False)
    for which in ("model", "ema"):
        a, b = (load_file(r / "checkpoints" / "step_0000008" / f"{which}.safetensors") for r in (straight, half))
        assert all(torch.equal(a[k], b[k]) for k in a), which


def test_settings_that_do_not_apply_are_one_line_errors(tmp_path, capsys):
    for argv, fragment in [(["--parameterization", "edm", "--prediction", "x0"], "--prediction applies to"),
                           (["--parameterization", "edm", "--schedule", "cosine"], "--schedule applies to"),
                           (["--sigma-data", "0.5"], "--sigma-data applies to --parameterization edm"),
                           (["--parameterization", "edm", "--sigma-data", "-1"], "--sigma-data) must be"),
                           (["--parameterization", "flow"], "--parameterization must be one of")]:
        assert main(["train", "--out", str(tmp_path), "--quiet", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("difflab: error:") and fragment in err, err
    assert not any(tmp_path.iterdir())  # refused before any folder was made
    with pytest.raises(DifflabError, match="cannot change sigma_data"):
        run = difflab.train(parameterization="edm", sigma_data=0.5, steps=1, out=str(tmp_path), **FAST)
        difflab.train(resume=run, steps=2, sigma_data=0.6, progress=False)
