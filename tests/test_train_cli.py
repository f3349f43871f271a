"""End to end on CPU: train the tiny preset on the bundled digits, sample, reload, resume, the CLI, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import difflab
from difflab.cli import main
from difflab.denoisers import Denoiser, VPParameterization
from difflab.errors import DifflabError
from difflab.models import load_model, model_config
from difflab.nn import UNet, unet_config
from difflab.schedules import make_schedule
from difflab.training.checkpoint import list_checkpoints, save_checkpoint

FAST = dict(batch_size=64, log_every=25, sample_every=150, checkpoint_every=150, num_samples=16, sample_steps=10)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A few hundred steps of the tiny U-Net on the bundled digits (about 20 s on 2 cores)."""
    out = tmp_path_factory.mktemp("runs")
    return difflab.train(steps=300, out=str(out), progress=False, **FAST)


def test_loss_goes_down_markedly(run):
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(25, 301, 25))
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.4 * first, (first, last)
    assert last < 0.2  # eps-MSE of a model that learned nothing is ~1


def test_run_folder_has_everything(run):
    for name in ("config.json", "log.jsonl", "loss.png", "samples.png", "samples/step_0000150.png", "samples/step_0000300.png"):
        assert (run / name).is_file(), name
    assert [c.name for c in list_checkpoints(run)] == ["step_0000150", "step_0000300"]
    assert json.loads((run / "config.json").read_text())["run"]["steps"] == 300
    grid = Image.open(run / "samples.png")
    assert grid.size[0] >= 4 * 64  # 8x8 digits are enlarged so people can see them


def test_samples_are_finite_images_in_range(run):
    images = difflab.sample(run, n=8, sampler="ddim", steps=20, device="cpu")
    assert images.shape == (8, 1, 8, 8) and torch.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0.1
    ddpm = difflab.sample(run, n=2, sampler="ddpm", steps=100, device="cpu", output="pil")
    assert len(ddpm) == 2 and ddpm[0].size == (8, 8) and ddpm[0].mode == "L"


def test_same_seed_same_images_at_any_batch_size(run):
    model = load_model(run, device="cpu")
    a = difflab.sample(model, n=5, steps=10, sampler="ddim", eta=1.0, seed=7, batch_size=5)
    b = difflab.sample(model, n=5, steps=10, sampler="ddim", eta=1.0, seed=7, batch_size=2)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    c = difflab.sample(model, n=2, steps=10, sampler="ddim", eta=1.0, seed=8)
    torch.testing.assert_close(a[1:3], c, rtol=1e-5, atol=1e-6)  # image i uses seed + i


def test_checkpoint_reloads_to_identical_outputs(tmp_path):
    ucfg = unet_config("tiny", image_size=8, in_channels=1)
    net = UNet(ucfg)
    for p in net.parameters():  # non-trivial weights everywhere (the output layer starts at zero)
        torch.nn.init.normal_(p, std=0.05)
    parameterization = VPParameterization(make_schedule("cosine", 500), "v")
    config = model_config(ucfg, parameterization=parameterization, data={"name": "digits"})
    save_checkpoint(tmp_path, 1, model=net, ema=net, config=config, state_tensors={}, state_json={})
    model = load_model(tmp_path, device="cpu")
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 30.0])
    expected = Denoiser(net, parameterization)(x, sigma)
    assert torch.equal(model.denoiser(x, sigma), expected)


def test_resume_is_bit_identical(tmp_path):
    common = dict(out=str(tmp_path), progress=False, batch_size=16, log_every=5, sample_every=0, checkpoint_every=10,
                  num_samples=4, sample_steps=2, model={"base_channels": 16}, warmup=5)
    straight = difflab.train(steps=20, name="straight", **common)
    half = difflab.train(steps=10, name="half", **common)
    resumed = difflab.train(resume=half, steps=20, progress=False)
    assert resumed == half
    for which in ("model", "ema"):
        a = load_file(straight / "checkpoints/step_0000020" / f"{which}.safetensors")
        b = load_file(half / "checkpoints/step_0000020" / f"{which}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), which
    assert [json.loads(r)["step"] for r in (half / "log.jsonl").read_text().splitlines()] == [5, 10, 15, 20]


def test_cli_train_and_sample(tmp_path, capsys):
    code = main(["train", "--steps", "20", "--out", str(tmp_path), "--name", "cli", "--batch-size", "16",
                 "--sample-every", "0", "--num-samples", "4", "--sample-steps", "3", "--quiet"])
    assert code == 0
    run = tmp_path / "cli"
    assert (run / "samples.png").is_file()
    code = main(["sample", str(run), "-n", "5", "--steps", "4", "--individual", "--out", str(tmp_path / "gen"), "--quiet"])
    assert code == 0
    assert len(list((tmp_path / "gen").glob("ddim_4steps_seed0_*.png"))) == 5
    assert (tmp_path / "gen" / "ddim_4steps_seed0.png").is_file()
    assert "ms/image" in capsys.readouterr().out
    code = main(["sample", str(run / "checkpoints" / "step_0000020"), "--sampler", "ddpm", "--steps", "10",
                 "-n", "2", "--variance", "beta", "--quiet"])
    assert code == 0 and (run / "generated" / "ddpm_10steps_seed0_variancebeta.png").is_file()
    # a YAML config file, with flags overriding it
    cfg = tmp_path / "run.yaml"
    cfg.write_text("steps: 5\nbatch_size: 8\nsample_every: 0\nnum_samples: 2\nsample_steps: 2\nmodel:\n  base_channels: 16\n")
    assert main(["train", "--config", str(cfg), "--steps", "6", "--out", str(tmp_path), "--name", "yaml", "--quiet"]) == 0
    saved = json.loads((tmp_path / "yaml" / "config.json").read_text())
    assert saved["run"]["steps"] == 6 and saved["run"]["batch_size"] == 8
    assert saved["diffusion"]["model"] == {"base_channels": 16}
    # a run folder's config.json is a config file too: a new run with the same settings
    assert main(["train", "--config", str(tmp_path / "yaml" / "config.json"), "--name", "again", "--steps", "2",
                 "--quiet"]) == 0
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["run"]["batch_size"] == 8 and again["diffusion"] == saved["diffusion"]


def _one_line_error(capsys, argv, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # progress bars may come before it
    assert err.startswith("difflab: error:") and "\n" not in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_bad_input_gives_one_line_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(capsys, ["train", "--dataset", str(empty), "--out", str(tmp_path)], "no images")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (i * 60, 10, 10)).save(photos / f"{i}.png")
    _one_line_error(capsys, ["train", "--dataset", str(photos), "--image-size", "30", "--preset", "small",
                             "--out", str(tmp_path)], "30", "4")
    _one_line_error(capsys, ["train", "--dataset", "imagenet-21k", "--out", str(tmp_path)], "imagenet-21k")
    _one_line_error(capsys, ["sample", str(tmp_path / "nope")], "nope")
    _one_line_error(capsys, ["train", "--preset", "huge", "--out", str(tmp_path)], "huge")
    _one_line_error(capsys, ["train", "--schedule", "exp", "--out", str(tmp_path)], "exp")
    _one_line_error(capsys, ["train", "--steps", "0", "--out", str(tmp_path)], "--steps")
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("stepz: 10\n")
    _one_line_error(capsys, ["train", "--config", str(bad_cfg)], "stepz")
    bad_cfg.write_text("steps: many\n")
    _one_line_error(capsys, ["train", "--config", str(bad_cfg)], "steps")


def test_runs_are_never_overwritten_by_accident(run, tmp_path, capsys):
    _one_line_error(capsys, ["train", "--out", str(run.parent), "--name", run.name], "already exists", "--resume")
    _one_line_error(capsys, ["train", "--resume", str(run), "--dataset", "mnist"], "dataset")
    _one_line_error(capsys, ["sample", str(run), "--sampler", "magic"], "magic")
    _one_line_error(capsys, ["sample", str(run), "--steps", "5000"], "5000")
    _one_line_error(capsys, ["sample", str(run), "--eta", "2"], "eta")


def test_default_run_names_are_numbered(tmp_path):
    a = difflab.train(steps=2, out=str(tmp_path), progress=False, batch_size=4, sample_every=0, num_samples=1,
                      sample_steps=1, model={"base_channels": 16})
    b = difflab.train(steps=2, out=str(tmp_path), progress=False, batch_size=4, sample_every=0, num_samples=1,
                      sample_steps=1, model={"base_channels": 16})
    assert (a.name, b.name) == ("digits", "digits-2")


def test_console_script_and_module_entry_point():
    for cmd in (["difflab", "--help"], [sys.executable, "-m", "difflab", "train", "--help"]):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    assert "--sampler" in subprocess.run(["difflab", "sample", "--help"], capture_output=True, text=True).stdout


def test_python_api_rejects_unknown_options():
    with pytest.raises(DifflabError, match="unknown option"):
        difflab.train(stepz=3)


def test_every_sampler_runs_on_a_trained_model_and_reports_nfe(run, capsys):
    from difflab.samplers import SAMPLERS

    model = load_model(run, device="cpu")
    for name, info in SAMPLERS.items():
        stats = {}
        images = difflab.generate(model, 3, sampler=name, steps=4, spacing="karras",
                                  stats=stats)
        assert torch.isfinite(images).all() and images.abs().max() <= 1.0 + 1e-6, name
        if info.nfe is None:  # adaptive: as many as the tolerance needs, never more than the budget
            assert 2 <= stats["nfe"] <= 200, name
        else:
            assert stats["nfe"] == info.nfe(4), name
    assert main(["samplers"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in SAMPLERS)
    assert main(["sample", str(run), "--sampler", "heun", "--steps", "3", "-n", "2", "--quiet", "--threshold", "0.99"]) == 0
    assert "5 network evaluations (NFE) each" in capsys.readouterr().out
    _one_line_error(capsys, ["sample", str(run), "--sampler", "ddim", "--churn", "3"], "churn", "ddim")


def test_ema_weights_stay_outside_autograd(tmp_path):
    from difflab.tasks import DiffusionTask
    from difflab.training import loop

    seen = {}

    class EmaSpy(DiffusionTask):  # a fake objective injected into the loop: it records the EMA it is shown
        def show(self, step, ema):
            seen["ema"] = ema
            super().show(step, ema)

    loop.train(EmaSpy, steps=3, out=str(tmp_path), progress=False, batch_size=4, sample_every=0, num_samples=1,
                  sample_steps=1, model={"base_channels": 16})
    assert all(p.grad_fn is None and not p.requires_grad for p in seen["ema"].parameters())


def test_resume_accepts_unchanged_values_and_refuses_unsupported_options(tmp_path):
    common = dict(out=str(tmp_path), progress=False, batch_size=4, sample_every=0, num_samples=1, sample_steps=1,
                  model={"base_channels": 16})
    run = difflab.train(steps=2, **common)
    assert difflab.train(resume=run, steps=3, image_size=8, hflip=False, progress=False) == run
    with pytest.raises(DifflabError, match="image_size"):
        difflab.train(resume=run, steps=4, image_size=16, progress=False)
    with pytest.raises(DifflabError, match="num_classes"):
        difflab.train(steps=2, **{**common, "model": {"num_classes": 10}})
