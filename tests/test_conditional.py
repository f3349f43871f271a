"""Class conditioning and guidance end to end on CPU: a conditional tiny U-Net on the bundled digits,
guided sampling judged by the shipped digits classifier, the noise-aware classifier, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import difflab
from difflab.cli import main
from difflab.errors import DifflabError
from difflab.metrics.domain import load_domain_extractor
from difflab.models import load_model
from difflab.tasks import DiffusionTask
from difflab.training import loop

FAST = dict(batch_size=64, log_every=50, sample_every=0, checkpoint_every=1000, num_samples=20, sample_steps=10)


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    """400 steps of a class-conditional tiny U-Net on the digits (about 30 s on 2 cores)."""
    return difflab.train(steps=400, conditional=True, out=str(tmp_path_factory.mktemp("runs")), progress=False, **FAST)


@pytest.fixture(scope="module")
def clf_run(tmp_path_factory):
    """A noise-aware classifier, 300 steps (about 10 s)."""
    return difflab.train_classifier(steps=300, batch_size=64, out=str(tmp_path_factory.mktemp("clf")), progress=False)


def _accuracy(images01: torch.Tensor, labels: torch.Tensor) -> float:
    judge = load_domain_extractor("digits")
    return float((judge.predict(images01 * 2 - 1) == labels).float().mean())


def test_guided_samples_are_the_requested_class(cond_run):
    model = load_model(cond_run, device="cpu")
    assert model.num_classes == 10 and model.class_names == [str(i) for i in range(10)]
    labels = torch.arange(10).repeat_interleave(12)
    acc = {}
    for w in (0.0, 1.0, 3.0):
        images = difflab.sample(model, 12, classes="all", guidance_scale=w, steps=20, seed=1)
        assert images.shape == (120, 1, 8, 8)
        acc[w] = _accuracy(images, labels)
    # w = 0 ignores the label (chance is 0.1); the conditional model follows it, guidance more so
    assert acc[0.0] < 0.3 and acc[1.0] > 0.6 and acc[3.0] > 0.8, acc
    assert acc[3.0] >= acc[1.0] - 0.05, acc


def test_per_class_grid_during_training(cond_run):
    grid = Image.open(cond_run / "samples.png")
    width, height = grid.size
    assert height > width  # 10 rows (one per class) of 2 images each (num_samples 20)
    assert json.loads((cond_run / "config.json").read_text())["diffusion"]["conditional"] is True


def test_label_dropout_feeds_the_null_class(tmp_path):
    seen = []

    class CondSpy(DiffusionTask):  # a fake objective injected into the loop: it records the conds it trains on
        def loss(self, net, batch):
            seen.append(batch.cond.clone())
            return super().loss(net, batch)

    common = dict(out=str(tmp_path), progress=False, batch_size=200, sample_every=0, num_samples=10, sample_steps=1,
                  model={"base_channels": 16}, conditional=True)
    loop.train(CondSpy, steps=5, label_dropout=0.25, name="a", **common)
    labels = torch.cat(seen)
    null_share = float((labels == 10).float().mean())
    assert 0.18 < null_share < 0.32 and labels.min() >= 0 and len(labels.unique()) == 11, null_share
    seen.clear()
    loop.train(CondSpy, steps=2, label_dropout=0.0, name="b", **common)
    assert not (torch.cat(seen) == 10).any()
    with pytest.raises(DifflabError, match="label-dropout"):
        difflab.train(steps=2, label_dropout=1.0, name="c", **common)


def test_folder_classes_and_names(tmp_path, capsys):
    folder = tmp_path / "shapes"
    for k, name in enumerate(["circle", "square"]):
        (folder / name).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (8, 8), 60 + 120 * k + i).save(folder / name / f"{i}.png")
    run = difflab.train(dataset=str(folder), conditional=True, steps=3, batch_size=4, out=str(tmp_path / "runs"),
                        progress=False, sample_every=0, num_samples=4, sample_steps=1, channels=1,
                        model={"base_channels": 16})
    model = load_model(run, device="cpu")
    assert model.class_names == ["circle", "square"]
    assert model.conditioner.parse("square").tolist() == [1]
    assert model.conditioner.parse("all").tolist() == [0, 1]
    assert main(["sample", str(run), "--class", "Square", "-n", "3", "--steps", "2", "--quiet"]) == 0
    assert "3 images" in capsys.readouterr().out
    unlabelled = tmp_path / "flat"
    unlabelled.mkdir()
    for i in range(3):
        Image.new("L", (8, 8), i).save(unlabelled / f"{i}.png")
    assert main(["train", "--dataset", str(unlabelled), "--conditional", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "labelled data" in capsys.readouterr().err


def test_noise_aware_classifier_accuracy_falls_with_noise(clf_run):
    table = json.loads((clf_run / "accuracy.json").read_text())
    rows = table["rows"]
    assert rows[0]["t"] == 0 and rows[-1]["t"] == 999
    assert rows[0]["accuracy"] > 0.8, rows  # nearly clean digits
    assert rows[-1]["accuracy"] < 0.25, rows  # pure noise: chance (0.1)
    assert (clf_run / "accuracy.png").is_file()
    clf = difflab.load_classifier(clf_run)
    x = torch.zeros(2, 1, 8, 8)
    assert clf(x, torch.tensor([0.1, 50.0])).shape == (2, 10)
    with pytest.raises(DifflabError, match="not a noise-aware classifier"):
        difflab.load_classifier(_model_dir(clf_run))


def _model_dir(clf_run):
    """A diffusion-model checkpoint to offer where a classifier is expected."""
    from difflab.denoisers import VPParameterization
    from difflab.models import model_config
    from difflab.nn import UNet, unet_config
    from difflab.schedules import make_schedule
    from difflab.training.checkpoint import save_checkpoint

    net = UNet(unet_config("tiny", image_size=8, in_channels=1, base_channels=16))
    folder = clf_run.parent / "a-model"
    save_checkpoint(folder, 1, model=net, ema=net, state_tensors={}, state_json={},
                    config=model_config(net.config, parameterization=VPParameterization(make_schedule("linear", 1000)),
                                        data={"name": "d"}))
    return folder


def test_classifier_guidance_steers_an_unconditional_model(cond_run, clf_run):
    # the conditional model without labels IS an unconditional model (its null class)
    model = load_model(cond_run, device="cpu")
    clf = difflab.load_classifier(clf_run)
    labels = torch.arange(10).repeat_interleave(10)
    acc = {}
    for s in (0.0, 4.0):
        images = difflab.generate(model, 100, cond=labels, classifier=clf,
                                  classifier_scale=s, steps=20, seed=3)
        acc[s] = _accuracy((images + 1) / 2, labels)
    assert acc[0.0] < 0.3 and acc[4.0] > 0.4, acc


def test_train_classifier_resumes_exactly(tmp_path):
    common = dict(out=str(tmp_path), progress=False, batch_size=16, checkpoint_every=4, log_every=2,
                  model={"base_channels": 16})
    straight = difflab.train_classifier(steps=8, name="straight", **common)
    half = difflab.train_classifier(steps=4, name="half", **common)
    assert difflab.train_classifier(resume=half, steps=8, progress=False) == half
    from safetensors.torch import load_file

    a = load_file(straight / "checkpoints/step_0000008/model.safetensors")
    b = load_file(half / "checkpoints/step_0000008/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(DifflabError, match="cannot change"):
        difflab.train_classifier(resume=half, steps=9, holdout=0.5, progress=False)


def _one_line_error(capsys, argv, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("difflab: error:") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_cli_guidance(cond_run, clf_run, tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(["sample", str(cond_run), "--class", "3", "--guidance-scale", "3.0", "-n", "4", "--steps", "5",
                 "--out", str(out), "--quiet", "--individual"]) == 0
    assert (out / "ddim_5steps_seed0_class3_cfg3.0.png").is_file()
    assert len(list(out.glob("ddim_5steps_seed0_class3_cfg3.0_*.png"))) == 4
    assert main(["sample", str(cond_run), "--steps", "3", "-n", "2", "--out", str(out), "--quiet",
                 "--guidance-rescale", "0.7"]) == 0  # default: every class, one row each
    assert "20 images" in capsys.readouterr().out
    uncond = difflab.train(steps=2, out=str(tmp_path), name="plain", progress=False, batch_size=8, sample_every=0,
                           num_samples=2, sample_steps=1)
    assert main(["sample", str(uncond), "--classifier", str(clf_run), "--class", "0,7", "--classifier-scale", "2",
                 "-n", "2", "--steps", "3", "--out", str(out), "--quiet"]) == 0
    assert "4 images" in capsys.readouterr().out
    _one_line_error(capsys, ["sample", str(cond_run), "--class", "eleven"], "unknown class", "0=0")
    _one_line_error(capsys, ["sample", str(cond_run), "--class", "12"], "unknown class")
    _one_line_error(capsys, ["sample", str(uncond), "--class", "3"], "unconditional")
    _one_line_error(capsys, ["sample", str(uncond), "--guidance-scale", "2"], "unconditional")
    _one_line_error(capsys, ["sample", str(cond_run), "--guidance-scale", "-1"], "guidance scale")
    _one_line_error(capsys, ["sample", str(cond_run), "--guidance-rescale", "2"], "rescale")
    _one_line_error(capsys, ["sample", str(cond_run), "--classifier", str(clf_run)], "class-conditional")
    _one_line_error(capsys, ["sample", str(uncond), "--classifier", str(uncond)], "not a noise-aware classifier")
    _one_line_error(capsys, ["sample", str(clf_run)], "noise-aware classifier, not a diffusion model")
    _one_line_error(capsys, ["train-classifier", "--dataset", str(tmp_path / "none"), "--out", str(tmp_path)], "none")
    _one_line_error(capsys, ["train-classifier", "--holdout", "1.5", "--out", str(tmp_path)], "holdout")


def test_classifier_resume_edge_cases(clf_run, tmp_path, capsys):
    before = sorted(p.name for p in (clf_run / "checkpoints").iterdir())
    assert difflab.train_classifier(resume=clf_run, steps=100, progress=False) == clf_run  # already has 300
    assert sorted(p.name for p in (clf_run / "checkpoints").iterdir()) == before
    assert json.loads((clf_run / "config.json").read_text())["run"]["steps"] == 300
    with pytest.raises(DifflabError, match="cannot change image_size"):
        difflab.train_classifier(resume=clf_run, steps=400, image_size=16, progress=False)
    plain = difflab.train(steps=1, out=str(tmp_path), name="plain", progress=False, batch_size=4, sample_every=0,
                          num_samples=1, sample_steps=1, model={"base_channels": 16})
    with pytest.raises(DifflabError, match="not a classifier run"):
        difflab.train_classifier(resume=plain, steps=5, progress=False)


def test_guidance_flag_edge_cases(cond_run, capsys):
    _one_line_error(capsys, ["sample", str(cond_run), "--class", ""], "empty class")
    _one_line_error(capsys, ["sample", str(cond_run), "--class", "\u00b2"], "unknown class")
    _one_line_error(capsys, ["sample", str(cond_run), "--guidance-scale", "nan"], "finite")
    _one_line_error(capsys, ["sample", str(cond_run), "--classifier-scale", "2"], "--classifier")
    with pytest.raises(DifflabError, match="guidance-scale"):
        difflab.train(steps=1, conditional=True, guidance_scale=-1.0, progress=False, out="/nonexistent")


def test_a_class_conditional_teacher_distils_with_guidance_folded_in(cond_run, tmp_path):
    run = difflab.distill(cond_run, guidance_scale=3.0, from_steps=4, to_steps=2, updates=2, batch_size=32,
                          num_samples=10, sample_every=0, progress=False, out=str(tmp_path))
    model = load_model(run, device="cpu")
    assert model.num_classes == 10 and model.distillation["guidance_scale"] == 3.0
    stats = {}
    images = difflab.sample(model, 2, classes="all", stats=stats)  # unguided by default: 1 evaluation per step
    assert images.shape == (20, 1, 8, 8) and stats["nfe"] == 2
    assert (run / "stage_2_steps" / "samples.png").is_file()
