"""Latent diffusion end to end (issue 12): train-vae on the digits, the latent statistics and the whitening rule,
the latent cache, a latent U-Net trained on it and sampled to pixels, Stable Diffusion's VAE through a diffusers
folder, and one-line refusals of bad input."""

from __future__ import annotations

import json
import math
import shutil

import diffusers  # a test dependency: builds a random AutoencoderKL folder in the diffusers format
import pytest
import torch
from safetensors.torch import load_file, save_file

import difflab
from difflab.cli import main
from difflab.data import load_dataset
from difflab.encoders import LatentEncoder, encode_moments, latent_cache, moments_statistics
from difflab.errors import DifflabError
from difflab.models import TrainedAutoencoder, load_autoencoder
from difflab.nn.vae import Autoencoder, autoencoder_config
from difflab.tasks import VAETask
from difflab.training import loop
from difflab.training.checkpoint import list_checkpoints

# a small autoencoder for 8x8 digits: f = 2 -> 2 x 4 x 4 latents
VAE = dict(preset="tiny-f2", model={"block_channels": [16, 32], "latent_channels": 2, "norm_groups": 8},
           batch_size=32, log_every=10, sample_every=0, num_samples=8, stats_images=512, progress=False)
UNET = dict(batch_size=32, log_every=10, sample_every=0, num_samples=4, sample_steps=2, warmup=2,
            model={"base_channels": 16}, progress=False)


@pytest.fixture(autouse=True)
def latent_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))  # the real datasets are not looked up there
    return tmp_path / "cache" / "latents"


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    return difflab.train_vae(steps=300, eval_every=25, out=str(out), name="vae", **VAE)


def _rows(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_train_vae_reconstructions_improve_and_statistics_are_recorded(vae_run):
    psnr = [r["eval_psnr"] for r in _rows(vae_run) if "eval_psnr" in r]
    assert len(psnr) == 12 and psnr[-1] > psnr[0] + 6, psnr  # dB: reconstructions improve markedly
    assert (vae_run / "reconstructions.png").is_file() and (vae_run / "loss.png").is_file()
    final = list_checkpoints(vae_run)[-1]
    stats = json.loads((final / "config.json").read_text())["latent_stats"]
    assert len(stats["mean"]) == 2 and all(s > 0 for s in stats["std"]) and stats["images"] == 512
    trained = difflab.load(vae_run, device="cpu")
    assert isinstance(trained, TrainedAutoencoder) and trained.mean == stats["mean"] and trained.image_size == 8
    # the recorded statistics are those of the latents the encoder gives (recomputed here the same way)
    images = load_dataset("digits").images
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(1))[:512]
    encoder = trained.encoder()
    mean, std = moments_statistics(*encode_moments(encoder, images[pick]))
    assert torch.allclose(torch.tensor(mean), torch.tensor(stats["mean"]), atol=1e-5)
    assert torch.allclose(torch.tensor(std), torch.tensor(stats["std"]), atol=1e-5)


def test_moments_statistics_match_posterior_draws():
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(400, 3, 4, 4, generator=g) * 2 + 1, torch.rand(400, 3, 4, 4, generator=g) + 0.2
    mu, sd = moments_statistics(mean, std)
    draws = mean.unsqueeze(0) + std.unsqueeze(0) * torch.randn(200, *mean.shape, generator=g)  # z ~ q(z|x)
    assert torch.allclose(torch.tensor(mu, dtype=torch.float32), draws.mean(dim=(0, 1, 3, 4)), atol=0.02)
    assert torch.allclose(torch.tensor(sd, dtype=torch.float32), draws.std(dim=(0, 1, 3, 4)), atol=0.02)


def test_whitening_is_invertible_and_decoding_is_float32_under_autocast():
    ae = Autoencoder(autoencoder_config("tiny-f2", in_channels=1, block_channels=[16, 32], latent_channels=2,
                                        norm_groups=8))
    enc = LatentEncoder(ae, [0.5, -1.0], [2.0, 0.25])
    z = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    assert torch.allclose(enc.unwhiten(enc.whiten(z)), z, atol=1e-6)
    x = enc.whiten(z).float()
    assert torch.allclose(x[:, 1], (z[:, 1].float() + 1.0) / 0.25)  # (z - mean_c) / std_c, per channel
    plain = enc.decode(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = enc.decode(x)
    assert under.dtype == torch.float32 and torch.equal(under, plain) and bool(torch.isfinite(under).all())


def test_cached_latents_equal_on_the_fly_encoding_and_a_stale_cache_is_rebuilt(vae_run, latent_cache_dir, capsys):
    encoder = difflab.load(vae_run, device="cpu").encoder()
    images = load_dataset("digits").images[:100]
    mean, std = latent_cache(encoder, images, data_name="digits", hflip=True)
    q, q_flip = encoder.posterior(images), encoder.posterior(images.flip(-1))
    assert torch.equal(mean[:100], q.mean) and torch.equal(std[:100], q.std)
    assert torch.equal(mean[100:], q_flip.mean)  # the mirrored copy follows the originals
    (cached,) = latent_cache_dir.glob("*.safetensors")
    stamp = cached.stat().st_mtime_ns
    again = latent_cache(encoder, images, data_name="digits", hflip=True)  # reused, not re-encoded
    assert torch.equal(again[0], mean) and cached.stat().st_mtime_ns == stamp
    changed = images.clone()
    changed[0, 0, 0, 0] ^= 1  # one pixel of the dataset changes
    latent_cache(encoder, changed, data_name="digits", hflip=True)
    assert "the data changed since it was made; rebuilding it" in capsys.readouterr().out
    with torch.no_grad():
        encoder.autoencoder.decoder.conv_out.bias.add_(0.1)  # the autoencoder changes (its identity covers all weights)
    latent_cache(encoder, changed, data_name="digits", hflip=True)
    assert "the vae changed since it was made; rebuilding it" in capsys.readouterr().out


def test_latent_diffusion_trains_samples_and_resumes(vae_run, tmp_path):
    run = difflab.train(vae=str(vae_run), steps=6, checkpoint_every=3, out=str(tmp_path), name="latent", **UNET)
    model = difflab.load(run, device="cpu")
    assert model.shape == (2, 4, 4) and model.image_shape == (1, 8, 8) and not model.encoder.pixel_space
    assert (list_checkpoints(run)[-1] / "vae.safetensors").is_file()  # each checkpoint samples on its own
    assert main(["sample", str(run), "-n", "3", "--steps", "3", "--quiet", "--out", str(tmp_path / "gen")]) == 0
    images = difflab.sample(run, n=3, steps=3)
    assert images.shape == (3, 1, 8, 8) and bool(torch.isfinite(images).all())
    # resuming from step 3 ends where the uninterrupted run ended -- with the run's own autoencoder, even when the
    # --vae folder has gone meanwhile
    moved = shutil.copytree(vae_run, tmp_path / "vae-copy")
    short = difflab.train(vae=str(moved), steps=3, checkpoint_every=3, out=str(tmp_path), name="resumed", **UNET)
    shutil.rmtree(moved)
    resumed = loop.train(difflab.tasks.DiffusionTask, resume=short, steps=6, progress=False)
    a, b = (load_file(list_checkpoints(r)[-1] / "model.safetensors") for r in (run, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_latent_edm_conditional_with_guidance(vae_run, tmp_path):
    run = difflab.train(vae=str(vae_run), parameterization="edm", conditional=True, steps=4, out=str(tmp_path),
                        name="edm", **UNET)
    config = json.loads((run / "config.json").read_text())["diffusion"]
    assert 0.5 < config["sigma_data"] < 2.0  # whitened latents: close to 1 (measured in closed form)
    images = difflab.sample(run, n=2, classes=[3, 7], guidance_scale=3.0, steps=3)
    assert images.shape == (4, 1, 8, 8) and bool(torch.isfinite(images).all())


@pytest.mark.parametrize("task", ["vae"])
def test_train_vae_resume_is_bit_identical(tmp_path, task):
    settings = {**VAE, "gan": True, "gan_start": 3}  # the discriminator starts midway
    full = difflab.train_vae(steps=6, checkpoint_every=3, out=str(tmp_path), name="full", **settings)
    half = difflab.train_vae(steps=3, checkpoint_every=3, out=str(tmp_path), name="half", **settings)
    resumed = loop.train(VAETask, resume=half, steps=6, progress=False)
    for which in ("model", "ema"):
        a, b = (load_file(list_checkpoints(r)[-1] / f"{which}.safetensors") for r in (full, resumed))
        assert any(k.startswith("discriminator.") for k in a) and all(torch.equal(a[k], b[k]) for k in a), which
    rows = _rows(full)
    assert rows[-1]["gan_weight"] > 0 and math.isfinite(rows[-1]["d"])


def _diffusers_folder(tmp_path, **changes):
    vae = diffusers.AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
                                  layers_per_block=1, latent_channels=2, norm_num_groups=8, scaling_factor=0.5)
    folder = tmp_path / "sd-vae"
    vae.save_pretrained(folder)
    return folder


def test_stable_diffusion_style_vae_from_a_diffusers_folder(tmp_path):
    folder = _diffusers_folder(tmp_path)
    trained = load_autoencoder(folder, device="cpu")
    assert trained.mean == [0.0, 0.0] and trained.std == [2.0, 2.0]  # 1 / scaling_factor, from its own config
    run = difflab.train(vae=str(folder), steps=2, out=str(tmp_path), name="sd", **UNET)
    assert difflab.sample(run, n=2, steps=2).shape == (2, 1, 8, 8)
    config = json.loads((list_checkpoints(run)[-1] / "config.json").read_text())
    assert config["encoder"]["std"] == [2.0, 2.0] and config["encoder"]["source"] == str(folder)


def test_bad_vae_input_is_one_line(vae_run, tmp_path, one_line):
    out = ["--out", str(tmp_path / "o"), "--quiet", "--steps", "1"]
    diffusion = difflab.train(steps=1, out=str(tmp_path), name="pixels", **UNET)
    one_line(["train", "--vae", str(diffusion), *out], "is a diffusion model, not an autoencoder")
    one_line(["train", "--vae", str(tmp_path / "missing"), *out], "missing")
    one_line(["train", "--vae", str(vae_run), "--image-size", "16", *out], "trained on 8x8", "--image-size 8")
    one_line(["train", "--vae", str(vae_run), "--channels", "3", *out], "1-channel", "3")
    folder = _diffusers_folder(tmp_path)
    weights = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["decoder.conv_out.weight"] = tensors["decoder.conv_out.weight"][:, :, :2].contiguous()  # mis-shaped
    save_file(tensors, weights)
    one_line(["train", "--vae", str(folder), *out], "decoder.conv_out.weight")
    del tensors["encoder.conv_in.weight"]  # missing
    save_file(tensors, weights)
    one_line(["train", "--vae", str(folder), *out], "encoder.conv_in.weight")
    one_line(["sample", str(vae_run)], "autoencoder", "not a diffusion model")
    one_line(["train", "--vae", "tests/no-such-vae", *out], "no such folder")  # local-looking: never the Hub
    one_line(["train-vae", "--config", str(_yaml(tmp_path, "model: {in_channels: 3, out_channels: 2}")), *out],
             "out_channels")
    one_line(["train-vae", "--config", str(_yaml(tmp_path, "model: {block_channels: 64}")), *out], "block_channels")
    one_line(["train-vae", "--preset", "huge", *out], "huge")
    one_line(["train-vae", "--kl-weight", "-1", *out], "--kl-weight")
    assert not (tmp_path / "o").exists()


def _yaml(tmp_path, text):
    path = tmp_path / "options.yaml"
    path.write_text(text)
    return path


def test_hub_uploads_with_the_old_attention_names_load(tmp_path):
    """Many Hub copies of Stable Diffusion's VAE name the mid-block attention query/key/value/proj_attn (diffusers
    before 0.15); they load, and decode like the new names."""
    folder = _diffusers_folder(tmp_path)
    weights = folder / "diffusion_pytorch_model.safetensors"
    new = load_file(weights)
    old = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
           .replace(".to_out.0.", ".proj_attn."): v for k, v in new.items()}
    assert any(".query." in k for k in old)
    save_file(old, weights)
    loaded = load_autoencoder(folder, device="cpu").autoencoder
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in new.items())


def test_eval_vae_measures_reconstructions(vae_run, tmp_path, capsys):
    assert main(["eval-vae", str(vae_run), "--real", "digits:train", "-n", "300", "--quiet",
                 "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["real"] == "digits:train"
    assert result["latent_shape"] == [2, 4, 4] and result["compression"] == 2.0
    assert 15 < result["psnr"] < 60 and 0 < result["ssim"] <= 1 and result["rfid"] >= 0
    assert "PSNR" in capsys.readouterr().out
    with pytest.raises(DifflabError):
        difflab.load_autoencoder(tmp_path / "nothing-here", device="cpu")
    shutil.rmtree(tmp_path / "o", ignore_errors=True)


def test_a_latent_model_distils_both_ways(vae_run, tmp_path):
    """Progressive and consistency distillation of a latent teacher: the students carry the autoencoder and sample."""
    teacher = difflab.train(vae=str(vae_run), steps=2, out=str(tmp_path), name="latent", **UNET)
    small = dict(updates=2, convert_updates=1, batch_size=32, num_samples=4, sample_every=0, progress=False,
                 out=str(tmp_path))
    for run in (difflab.distill(teacher, from_steps=4, to_steps=2, **small),
                difflab.distill(teacher, method="consistency", grid_points=4, **small)):
        assert (list_checkpoints(run)[-1] / "vae.safetensors").is_file()
        model = difflab.load_model(run, device="cpu")
        assert isinstance(model.encoder, LatentEncoder) and model.distillation is not None
        stats = {}
        images = difflab.generate(model, 2, stats=stats)
        assert images.shape == (2, 1, 8, 8) and stats["nfe"] == model.distillation["steps"]
    assert {p.name for p in tmp_path.glob("latent-progressive/stage_*")} == {"stage_4_steps", "stage_2_steps"}
