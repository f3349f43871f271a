"""The KL autoencoder: the posterior's math, shapes and presets, numerical parity with diffusers' AutoencoderKL
through the loader, the loader's one-line refusals, the patch discriminator and the GAN losses."""

import json
import math
import shutil
import sys

import diffusers  # a test dependency: the parity oracle
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from difflab.errors import DifflabError
from difflab.nn import (
    VAE_PRESETS,
    Autoencoder,
    AutoencoderConfig,
    DiagonalGaussian,
    DiscriminatorConfig,
    PatchDiscriminator,
    adaptive_gan_weight,
    autoencoder_config,
    hinge_d_loss,
    hinge_g_loss,
)
from difflab.vae_io import is_diffusers_autoencoder, load_diffusers_autoencoder


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message, message
    return message


def random_moments(n=2, c=3, h=4, w=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    logvar = torch.empty(n, c, h, w, dtype=dtype).uniform_(-2.0, 1.0, generator=g)
    return torch.cat([mean, logvar], dim=1), mean, logvar


# ----------------------------------------------------------------------------------------------------------------
# The posterior N(mean, diag(exp(logvar)))

def test_kl_matches_closed_form_and_monte_carlo():
    moments, mean, logvar = random_moments()
    q = DiagonalGaussian(moments)
    std = (0.5 * logvar).exp()
    exact = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std),
                                              torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    assert q.kl().shape == (2,)
    torch.testing.assert_close(q.kl(), exact, rtol=1e-12, atol=1e-12)

    # KL = E_q[log q(z) - log p(z)]: estimate it from 20000 reparameterised draws per example.
    draws = 20000
    qd = DiagonalGaussian(moments.repeat(draws, 1, 1, 1))
    z = qd.sample(torch.Generator().manual_seed(1)).unflatten(0, (draws, 2))  # (M, N, C, h, w)
    log_ratio = (torch.distributions.Normal(mean, std).log_prob(z)
                 - torch.distributions.Normal(0.0, 1.0).log_prob(z)).flatten(2).sum(2)  # (M, N)
    estimate, stderr = log_ratio.mean(0), log_ratio.std(0) / math.sqrt(draws)
    assert ((estimate - q.kl()).abs() < 4 * stderr).all(), (estimate, q.kl(), stderr)


def test_sample_has_posterior_moments_is_seeded_and_logvar_is_clamped():
    moments, mean, logvar = random_moments(n=1, c=2, h=3, w=3)
    draws = 8000
    q = DiagonalGaussian(moments.expand(draws, -1, -1, -1))
    z = q.sample(torch.Generator().manual_seed(0))  # (M, C, h, w)
    std = (0.5 * logvar[0]).exp()
    assert ((z.mean(0) - mean[0]).abs() < 4 * std / math.sqrt(draws)).all()
    assert ((z.std(0) / std - 1).abs() < 4 / math.sqrt(2 * draws)).all()

    q1 = DiagonalGaussian(moments)
    a, b = q1.sample(torch.Generator().manual_seed(5)), q1.sample(torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, q1.sample(torch.Generator().manual_seed(6)))
    assert torch.equal(q1.mode(), mean)

    # reparameterised: dz/dmean = 1, dz/dlogvar = 0.5 * std * eps
    leaf = moments.clone().requires_grad_(True)
    z = DiagonalGaussian(leaf).sample(torch.Generator().manual_seed(5))
    z.sum().backward()
    eps = (a - mean) / (0.5 * logvar).exp()
    torch.testing.assert_close(leaf.grad, torch.cat([torch.ones_like(mean), 0.5 * (0.5 * logvar).exp() * eps], 1))

    extreme = torch.cat([torch.zeros(1, 2, 1, 1), torch.tensor([100.0, -100.0]).view(1, 2, 1, 1)], dim=1)
    q = DiagonalGaussian(extreme)
    assert q.logvar.flatten().tolist() == [20.0, -30.0] and torch.isfinite(q.var).all() and (q.std > 0).all()
    q = DiagonalGaussian(extreme, logvar_min=-2.0, logvar_max=3.0)
    assert q.logvar.flatten().tolist() == [3.0, -2.0]


# ----------------------------------------------------------------------------------------------------------------
# Shapes, presets, config errors

@pytest.mark.parametrize("channels", [[8, 16], [8, 16, 16], [8, 8, 16, 16]])
def test_shapes_for_f_2_4_8(channels):
    config = AutoencoderConfig(block_channels=channels, layers_per_block=1, norm_groups=4, latent_channels=3)
    f = config.downsampling_factor
    assert f == 2 ** (len(channels) - 1)
    torch.manual_seed(0)
    model = Autoencoder(config)
    x = torch.randn(2, 3, 16, 24)
    posterior = model.encode(x)
    assert posterior.mean.shape == posterior.logvar.shape == (2, 3, 16 // f, 24 // f)
    assert config.latent_shape(16) == (3, 16 // f, 16 // f)
    recon, posterior = model(x, torch.Generator().manual_seed(0))
    assert recon.shape == x.shape and posterior.kl().shape == (2,)
    assert model.last_layer is model.decoder.conv_out.weight
    with pytest.raises(DifflabError) as error:
        config.latent_shape(17)
    assert "not divisible" in one_line(error)
    with pytest.raises(DifflabError) as error:
        model.encode(torch.randn(1, 3, 16 + 1, 16))
    assert f"divisible by {f}" in one_line(error)


def count(config: AutoencoderConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Autoencoder(config).parameters())


def test_presets_and_their_sizes():
    assert set(VAE_PRESETS) >= {"tiny", "tiny-f2", "small", "sd"}
    tiny, tiny_f2, small, sd = (autoencoder_config(p) for p in ["tiny", "tiny-f2", "small", "sd"])
    assert (tiny.downsampling_factor, tiny_f2.downsampling_factor, small.downsampling_factor,
            sd.downsampling_factor) == (4, 2, 4, 8)
    assert 1e6 <= count(tiny) <= 2e6 and 1e6 <= count(tiny_f2) <= 2e6 and 8e6 <= count(small) <= 15e6
    # Stable Diffusion's VAE: exactly diffusers' AutoencoderKL with SD's config, key by key.
    with torch.device("meta"):
        reference = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                            down_block_types=("DownEncoderBlock2D",) * 4,
                                            up_block_types=("UpDecoderBlock2D",) * 4)
        ours = Autoencoder(sd)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert count(sd) == 83_653_863
    assert autoencoder_config("tiny", in_channels=1).in_channels == 1
    assert AutoencoderConfig.from_dict(json.loads(json.dumps(tiny.to_dict()))) == tiny


@pytest.mark.parametrize("build, expected", [
    (lambda: autoencoder_config("huge"), "unknown autoencoder preset 'huge'"),
    (lambda: autoencoder_config("tiny", channels=[8]), "unknown autoencoder option(s) channels"),
    (lambda: AutoencoderConfig(block_channels=[32, 48], norm_groups=32), "does not divide the channel count(s) [48]"),
    (lambda: AutoencoderConfig(block_channels=[]), "block_channels must be a non-empty list"),
    (lambda: AutoencoderConfig(latent_channels=0), "latent_channels must be a positive integer"),
])
def test_config_errors_are_one_line(build, expected):
    with pytest.raises(DifflabError) as error:
        build()
    assert expected in one_line(error)


# ----------------------------------------------------------------------------------------------------------------
# Parity with diffusers through the loader

SMALL_F4 = dict(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=3, norm_num_groups=8,
                mid_block_add_attention=False)
SMALL_F8 = dict(block_out_channels=(16, 16, 32, 32), layers_per_block=2, latent_channels=4, norm_num_groups=8,
                out_channels=2, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.5, shift_factor=0.1)


def save_reference(folder, seed=0, **kwargs):
    """A random diffusers AutoencoderKL saved to ``folder``; returns the model."""
    levels = len(kwargs["block_out_channels"])
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                                  up_block_types=("UpDecoderBlock2D",) * levels, **kwargs).eval()
    vae.save_pretrained(folder)
    return vae


def assert_float32_close(ours, theirs):
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * max(1.0, theirs.abs().max().item()))


@pytest.mark.parametrize("kwargs, size, factors", [(SMALL_F4, (24, 16), (0.18215, 0.0)),
                                                   (SMALL_F8, (32, 40), (0.5, 0.1))], ids=["f4", "f8"])
def test_parity_with_diffusers(tmp_path, kwargs, size, factors):
    vae = save_reference(tmp_path, **kwargs)
    if "scaling_factor" not in kwargs:  # a config without the fields: diffusers' defaults
        config = json.loads((tmp_path / "config.json").read_text())
        del config["scaling_factor"], config["shift_factor"]
        (tmp_path / "config.json").write_text(json.dumps(config))
    assert is_diffusers_autoencoder(tmp_path)
    loaded = load_diffusers_autoencoder(tmp_path)
    model, c = loaded.autoencoder, loaded.autoencoder.config
    assert (loaded.scaling_factor, loaded.shift_factor, loaded.source) == (*factors, str(tmp_path))
    assert c.block_channels == list(kwargs["block_out_channels"])
    assert c.mid_attention == kwargs.get("mid_block_add_attention", True)
    assert c.quant_conv == kwargs.get("use_quant_conv", True)
    assert any(k.endswith("conv_shortcut.weight") for k in model.state_dict())

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, *size, generator=g) * 2 - 1
    z = torch.randn(2, c.latent_channels, size[0] // c.downsampling_factor, size[1] // c.downsampling_factor,
                    generator=g)
    with torch.no_grad():
        theirs = vae.encode(x).latent_dist
        ours = model.encode(x)
        assert_float32_close(ours.mean, theirs.mean)
        assert_float32_close(ours.logvar, theirs.logvar)
        assert_float32_close(model.decode(z), vae.decode(z).sample)


def test_pipeline_folder_loads_its_vae(tmp_path):
    save_reference(tmp_path / "vae", **SMALL_F4)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert is_diffusers_autoencoder(tmp_path) and not is_diffusers_autoencoder(tmp_path / "missing")
    assert load_diffusers_autoencoder(tmp_path).autoencoder.config.latent_channels == 3


# ----------------------------------------------------------------------------------------------------------------
# The loader's refusals

@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    save_reference(folder, **SMALL_F4)
    return folder


def edit_weights(edit):
    def apply(folder):
        weights = load_file(folder / "diffusion_pytorch_model.safetensors")
        edit(weights)
        save_file(weights, folder / "diffusion_pytorch_model.safetensors")
    return apply


def edit_config(**changes):
    def apply(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return apply


def rename_weights(folder):
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "diffusion_pytorch_model.bin")


@pytest.mark.parametrize("damage, expected", [
    (edit_weights(lambda w: w.pop("encoder.conv_in.weight")), "missing: encoder.conv_in.weight"),
    (edit_weights(lambda w: w.update({"decoder.conv_out.bias": torch.zeros(5)})),
     "mis-shaped: decoder.conv_out.bias (5,) (model (3,))"),
    (edit_weights(lambda w: w.update({"encoder.extra.weight": torch.zeros(1)})), "unknown: encoder.extra.weight"),
    (edit_config(_class_name="VQModel"), "'VQModel', not an AutoencoderKL"),
    (edit_config(down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D"]),
     "down_block_types"),
    (edit_config(latents_mean=[0.0, 0.0, 0.0]), "latents_mean"),
    (rename_weights, "only pickled weights"),
    (lambda folder: (folder / "diffusion_pytorch_model.safetensors").unlink(), "no weights file"),
    (lambda folder: (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64), "cannot read"),
    (lambda folder: (folder / "config.json").write_text("{"), "cannot read"),
], ids=["missing", "shape", "unknown", "class", "block", "latents_mean", "bin", "no-weights", "corrupt", "json"])
def test_loader_refuses_in_one_line(tmp_path, reference_folder, damage, expected):
    folder = tmp_path / "vae"
    shutil.copytree(reference_folder, folder)
    damage(folder)
    with pytest.raises(DifflabError) as error:
        load_diffusers_autoencoder(folder)
    assert expected in one_line(error)


def test_missing_folder_and_hub_ids_fail_fast(tmp_path, monkeypatch):
    with pytest.raises(DifflabError) as error:
        load_diffusers_autoencoder(tmp_path / "nowhere" / "vae")
    assert "no such folder" in one_line(error)

    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)  # read at import time, so set it too
    with pytest.raises(DifflabError) as error:
        load_diffusers_autoencoder("difflab-tests/no-such-vae")
    assert "downloading it from the Hugging Face Hub failed" in one_line(error)

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if it were not installed
    with pytest.raises(DifflabError) as error:
        load_diffusers_autoencoder("difflab-tests/no-such-vae")
    assert "huggingface_hub is not installed" in one_line(error)


# ----------------------------------------------------------------------------------------------------------------
# Discriminator and GAN losses

def test_patch_discriminator_shapes():
    torch.manual_seed(0)
    disc = PatchDiscriminator(DiscriminatorConfig(in_channels=3, base_channels=8, layers=3, norm_groups=4))
    assert disc(torch.randn(2, 3, 32, 48)).shape == (2, 1, 2, 4)  # H / 2^layers - 2
    disc2 = PatchDiscriminator(DiscriminatorConfig(in_channels=1, base_channels=8, layers=2))
    assert disc2(torch.randn(3, 1, 16, 16)).shape == (3, 1, 2, 2)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in disc.modules()) and not list(disc.buffers())
    with pytest.raises(DifflabError) as error:
        disc(torch.randn(1, 3, 20, 20))
    assert "H, W >= 24" in one_line(error)


def test_hinge_losses_on_hand_picked_logits():
    real = torch.tensor([[2.0, 0.5], [-1.0, 1.0]]).view(2, 1, 1, 2)
    fake = torch.tensor([[-2.0, 0.0], [0.5, -0.5]]).view(2, 1, 1, 2)
    # example 0: real hinge (0 + 0.5) / 2 = 0.25, fake (0 + 1) / 2 = 0.5 -> 0.375
    # example 1: real hinge (2 + 0) / 2 = 1, fake (1.5 + 0.5) / 2 = 1 -> 1
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor([0.375, 1.0]))
    torch.testing.assert_close(hinge_g_loss(fake), torch.tensor([1.0, 0.0]))


def test_adaptive_gan_weight_against_hand_computation():
    # a "decoder" whose last layer is y = W x: d(y - t)^2/dW = 2 (y - t) x, d(-c y)/dW = -c x
    x = torch.tensor([1.0, -2.0, 2.0])  # |x| = 3
    weight = nn.Parameter(torch.tensor([[0.5, 0.25, 1.0]]))
    y = (weight @ x).squeeze()  # 0.5 - 0.5 + 2 = 2
    target, c = 0.5, 0.2
    rec_loss, g_loss = (y - target) ** 2, -c * y
    expected = (2 * 1.5 * 3) / (0.2 * 3 + 1e-4)
    w = adaptive_gan_weight(rec_loss, g_loss, weight)
    torch.testing.assert_close(w, torch.tensor(expected))
    assert not w.requires_grad
    assert adaptive_gan_weight(rec_loss, g_loss, weight, max_weight=5.0).item() == 5.0
    assert adaptive_gan_weight(rec_loss.expand(4), g_loss.expand(4), weight).item() == pytest.approx(expected)
    (rec_loss + w * g_loss).backward()  # the graph was retained
    torch.testing.assert_close(weight.grad, (2 * 1.5 - expected * c) * x[None])


def test_autoencoder_with_discriminator_backpropagates():
    torch.manual_seed(0)
    model = Autoencoder(AutoencoderConfig(block_channels=[8, 16], layers_per_block=1, norm_groups=4))
    disc = PatchDiscriminator(DiscriminatorConfig(base_channels=8, layers=2, norm_groups=4))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, posterior = model(x, torch.Generator().manual_seed(0))
    rec_loss = (recon - x).abs().flatten(1).mean(1) + 1e-6 * posterior.kl()
    g_loss = hinge_g_loss(disc(recon))
    w = adaptive_gan_weight(rec_loss, g_loss, model.last_layer)
    assert w.ndim == 0 and 0 < w.item() < 1e4
    (rec_loss + w * g_loss).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
