"""diffusers folders as difflab models, and difflab models as diffusers folders.

Parity is measured on small random networks saved with ``save_pretrained`` here (no hub access): difflab's DDIM and
Euler on a loaded ``UNet2DModel`` pipeline follow diffusers' own DDIMPipeline / scheduler loop on the same noise,
a Stable Diffusion layout (UNet2DConditionModel + AutoencoderKL + a tiny CLIP text encoder) gives the same prompt
embeddings, denoiser call and guided images, and an exported difflab model samples the same in DDPMPipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors

import difflab
from difflab.cli import main
from difflab.conditioning import ClassConditioner
from difflab.denoisers import Denoiser, EDMParameterization, VPParameterization
from difflab.encoders import PixelEncoder
from difflab.errors import DifflabError
from difflab.export import export_diffusers, export_file
from difflab.models import Model, model_config
from difflab.nn import UNet, unet_config
from difflab.samplers import get_sampler
from difflab.schedules import make_schedule

PREDICTION_NAMES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def _randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Random weights everywhere (zero-initialised layers would hide a wrong mapping); norm scales near 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(noise + 1.0 if p.ndim == 1 and name.endswith("norm.weight") else noise)
    return module.eval()


def _as01(pixels: torch.Tensor):
    """difflab's [-1, 1] (N, C, H, W) -> diffusers' output_type="np": (N, H, W, C) in [0, 1]."""
    return (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _ddpm_like_unet(**changes) -> diffusers.UNet2DModel:
    """google/ddpm-cifar10-32's settings, tiny: sin/cos order and frequency shift, eps 1e-6, one head per block."""
    kw = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
              down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
              norm_num_groups=8, attention_head_dim=None, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6)
    return _randomize(diffusers.UNet2DModel(**{**kw, **changes}))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_unet2d_pipeline_ddim_and_euler_follow_diffusers(tmp_path, prediction):
    unet = _ddpm_like_unet()
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                                        prediction_type=PREDICTION_NAMES[prediction])
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.save_pretrained(tmp_path / "pipe")
    model = difflab.load(tmp_path / "pipe", device="cpu")
    assert model.shape == (3, 8, 8) and model.parameterization.prediction == prediction
    for seed in (0, 1):  # DDIM: diffusers' own pipeline, image i from its own generator, as difflab does
        theirs = pipe(batch_size=1, generator=torch.Generator().manual_seed(seed), num_inference_steps=10, eta=0.0,
                      output_type="np").images
        ours = difflab.generate(model, 1, sampler="ddim", steps=10, spacing="leading", clip=False, seed=seed)
        assert abs(_as01(ours) - theirs).max() < 2e-5
    # Euler: diffusers' EulerDiscreteScheduler loop (sigma-space Euler on x_t / sqrt(abar)), compared step by step
    euler = diffusers.EulerDiscreteScheduler.from_config(scheduler.config, timestep_spacing="leading")
    euler.set_timesteps(8)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    x, trajectory = noise * euler.init_noise_sigma, []
    with torch.no_grad():
        for t in euler.timesteps:
            out = unet(euler.scale_model_input(x, t), t).sample
            x = euler.step(out, t, x).prev_sample
            trajectory.append(x)
    sigmas = model.parameterization.sampling_sigmas(8, "leading")
    # the same grid; diffusers computes (1 - abar) / abar in float32, which near t = 0 loses ~1e-4 relative
    torch.testing.assert_close(sigmas[:-1].float(), euler.sigmas[:-1].float(), rtol=2e-4, atol=0)
    seen = []  # the x each step starts from: seen[1:] are the iterates after steps 1 .. N-1
    final = get_sampler("euler")(model.denoiser, noise * float(euler.init_noise_sigma), sigmas,
                                 callback=lambda i, sigma, x, x0: seen.append(x.clone()))
    for got, want in zip(seen[1:] + [final], trajectory, strict=True):
        assert float((got - want).abs().max()) < 1e-4 * max(1.0, float(want.abs().max()))


def _tiny_clip(path, width=32):
    """A CLIP text encoder (causal, final LayerNorm) with a word-level tokenizer, built offline; max length 12."""
    words = ["<pad>", "<unk>", "<bos>", "<eos>", "a", "red", "blue", "circle", "square", "photo", "of", "cat"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", special_tokens=[("<bos>", 2),
                                                                                                 ("<eos>", 3)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                                     bos_token="<bos>", eos_token="<eos>", model_max_length=12)
    cfg = transformers.CLIPTextConfig(vocab_size=len(words), hidden_size=width, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=12,
                                      bos_token_id=2, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    return tokenizer, transformers.CLIPTextModel(cfg).eval()


def _sd_folder(tmp_path, prediction: str):
    """A Stable Diffusion pipeline folder of tiny random parts (UNet2DConditionModel, AutoencoderKL, CLIP)."""
    tokenizer, text_encoder = _tiny_clip(tmp_path)
    unet = _randomize(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8), seed=1)
    vae = _randomize(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
        norm_num_groups=8, scaling_factor=0.3), seed=2, std=0.02)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                        beta_end=0.012, clip_sample=False, set_alpha_to_one=True, steps_offset=1,
                                        prediction_type=PREDICTION_NAMES[prediction])
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "sd")
    return tmp_path / "sd", pipe


@pytest.mark.parametrize("prediction", ["eps", "v"])  # SD 1.x predicts eps, SD 2.x (768) v
def test_stable_diffusion_layout_is_a_latent_text_model(tmp_path, prediction):
    folder, pipe = _sd_folder(tmp_path, prediction)
    model = difflab.load(folder, device="cpu")
    assert model.takes_prompts and not model.encoder.pixel_space and model.shape == (4, 8, 8)
    assert model.image_shape == (3, 16, 16) and model.parameterization.prediction == prediction
    prompt = "a photo of a red cat"
    # the prompt embeddings (padded to the tokenizer's max length, no mask) and the empty prompt's
    cond_theirs, null_theirs = pipe.encode_prompt(prompt, "cpu", 1, True, negative_prompt=None)
    cond = model.conditioner.encode([prompt])
    torch.testing.assert_close(cond["tokens"], cond_theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.conditioner.null(1)["tokens"], null_theirs, rtol=0, atol=1e-6)
    # one denoiser call == the diffusers U-Net on the same latents, timestep and embeddings
    schedule = model.parameterization.schedule
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 700])
    abar = schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    sigma = schedule.sigmas[t].float()
    with torch.no_grad():
        out = pipe.unet(x_t, t, encoder_hidden_states=cond_theirs.expand(2, -1, -1)).sample
        ours = model.denoiser(x_t / abar.sqrt(), sigma, {k: v.expand(2, *v.shape[1:]) for k, v in cond.items()})
    if prediction == "eps":  # x0 from the U-Net's output, as diffusers' schedulers compute it
        x0_theirs = (x_t - (1 - abar).sqrt() * out) / abar.sqrt()
    else:
        x0_theirs = abar.sqrt() * x_t - (1 - abar).sqrt() * out
    torch.testing.assert_close(ours, x0_theirs, rtol=1e-4, atol=1e-5)
    # the whole guided pipeline: DDIM, 6 steps, guidance 4, decoded by each library's own VAE code. The pipeline
    # runs its scheduler with steps_offset 1 (SD's setting), so difflab is given the same timesteps.
    pipe.scheduler.set_timesteps(6)
    grid = torch.cat([schedule.sigmas[pipe.scheduler.timesteps], torch.zeros(1, dtype=torch.float64)])
    theirs = pipe(prompt, num_inference_steps=6, guidance_scale=4.0, generator=torch.Generator().manual_seed(3),
                  output_type="np").images
    ours = difflab.generate(model, 1, prompts=[prompt], sampler="ddim", sigmas=grid, seed=3, guidance_scale=4.0)
    assert abs(_as01(ours) - theirs).max() < 1e-4
    assert model.config["guidance_scale"] == 7.5  # SD's default when not told
    # the web page's generation path takes the same model (its own test drives the page in a browser)
    from difflab.serve import check_settings, describe, generate_images
    settings = check_settings(model, sampler="dpmpp_2m", steps=3, num=2, prompt=prompt, negative_prompt="a blue cat")
    assert settings["guidance_scale"] == 7.5 and len(generate_images(model, settings).images) == 2
    assert "latent 4x8x8" in describe(model) and "text-to-image" in describe(model)


def _write_weights(folder, change):
    weights = load_file(folder / "diffusion_pytorch_model.safetensors")
    change(weights)
    save_file(weights, folder / "diffusion_pytorch_model.safetensors")


def test_bad_diffusers_folders_are_one_line(tmp_path, one_line):
    pipe = diffusers.DDPMPipeline(unet=_ddpm_like_unet(), scheduler=diffusers.DDPMScheduler())
    good = tmp_path / "good"
    pipe.save_pretrained(good)
    index = json.loads((good / "model_index.json").read_text())

    def variant(name, edit):
        import shutil
        folder = tmp_path / name
        shutil.copytree(good, folder)
        edit(folder)
        return str(folder)

    unsupported = variant("kandinsky", lambda f: (f / "model_index.json").write_text(
        json.dumps({**index, "_class_name": "KandinskyPipeline"})))
    one_line(["sample", unsupported, "-n", "1"], "unsupported pipeline class 'KandinskyPipeline'")
    no_unet = variant("no-unet", lambda f: (f / "unet" / "config.json").unlink())
    one_line(["sample", no_unet, "-n", "1"], "missing unet/config.json")
    no_scheduler = variant("no-scheduler", lambda f: (f / "scheduler" / "scheduler_config.json").unlink())
    one_line(["sample", no_scheduler, "-n", "1"], "scheduler_config.json")
    mismatched = variant("mismatched", lambda f: _write_weights(
        f / "unet", lambda w: w.update({"conv_in.weight": torch.zeros(16, 3, 3, 3)})))
    one_line(["sample", mismatched, "-n", "1"], "unet/ weights do not match", "conv_in.weight")
    missing = variant("missing", lambda f: _write_weights(f / "unet", lambda w: w.pop("conv_out.bias")))
    one_line(["sample", missing, "-n", "1"], "unet/ weights do not match")
    unexpected = variant("unexpected", lambda f: _write_weights(f / "unet", lambda w: w.update(extra=torch.ones(2))))
    one_line(["sample", unexpected, "-n", "1"], "unet/ weights do not match", "extra")
    explicit = variant("explicit", lambda f: (f / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "trained_betas": [0.1] * 1000})))
    one_line(["sample", explicit, "-n", "1"], "trained_betas")
    one_line(["sample", str(tmp_path / "nowhere" / "x"), "-n", "1"], "nowhere")
    assert main(["sample", str(good), "-n", "2", "--steps", "3", "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


def _difflab_model(num_classes=None, preset="tiny", image_size=8, prediction="eps", schedule="linear", channels=3,
                   **unet):
    c = unet_config(preset, image_size=image_size, in_channels=channels, num_classes=num_classes, **unet)
    param = VPParameterization(make_schedule(schedule, 1000), prediction)
    cond = ClassConditioner([f"c{i}" for i in range(num_classes)], 0.1) if num_classes else None
    config = model_config(c, parameterization=param, conditioner=cond,
                          data={"name": "test", "channels": channels, "image_size": image_size})
    model = Model(Denoiser(_randomize(UNet(c)), param), PixelEncoder(), cond, config)
    model.denoiser.eval()
    return model


@pytest.mark.parametrize("schedule,prediction", [("linear", "x0"), ("cosine", "v")])
def test_export_round_trip_unconditional(tmp_path, schedule, prediction):
    # x0 and v networks keep random-weight images inside [0, 1] (an eps one saturates them: see the next test)
    model = _difflab_model(prediction=prediction, schedule=schedule)
    export_diffusers(model, tmp_path / "out")
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "out")
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    for seed in (0, 4):
        theirs = pipe(batch_size=1, generator=torch.Generator().manual_seed(seed), num_inference_steps=10,
                      output_type="np").images
        ours = difflab.generate(model, 1, sampler="ddim", steps=10, spacing="leading", clip=False, seed=seed)
        assert abs(_as01(ours) - theirs).max() < 2e-5 and ((theirs > 0) & (theirs < 1)).mean() > 0.5
    ddpm = pipe.__class__.from_pretrained(tmp_path / "out")(batch_size=2, num_inference_steps=5, output_type="np")
    assert ddpm.images.shape == (2, 8, 8, 3)  # DDPMPipeline's own (ancestral) sampling runs on the folder as written


def test_export_round_trip_class_conditional(tmp_path):
    model = _difflab_model(num_classes=3, preset="small", image_size=16)
    export_diffusers(model, tmp_path / "out")
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "out")
    assert pipe.unet.config.num_class_embeds == 4  # 3 classes + difflab's null class
    scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    scheduler.set_timesteps(8)
    labels = torch.tensor([2])
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(pipe.unet(x, t, class_labels=labels).sample, t, x).prev_sample
    # an eps network with random weights makes huge images: compare before difflab clamps them to [-1, 1]
    sigmas = model.parameterization.sampling_sigmas(8, "leading")
    noise = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    ours = get_sampler("ddim")(model.denoiser, noise * model.parameterization.prior_std(float(sigmas[0])), sigmas,
                               cond=labels)
    assert float((ours - x).abs().max()) < 2e-6 * float(x.abs().max())
    images = difflab.generate(model, 1, cond=labels, sampler="ddim", steps=8, spacing="leading", clip=False, seed=7,
                              guidance_scale=1.0)
    torch.testing.assert_close(images, x.clamp(-1, 1), rtol=0, atol=1e-5)
    back = difflab.load(tmp_path / "out", device="cpu")  # and back into difflab, class names included
    assert back.class_names == ["c0", "c1", "c2"]
    guided = difflab.generate(back, 1, cond=labels, sampler="ddim", steps=4, seed=1, guidance_scale=3.0)
    torch.testing.assert_close(guided, difflab.generate(model, 1, cond=labels, sampler="ddim", steps=4, seed=1,
                                                        guidance_scale=3.0), rtol=0, atol=5e-5)


def test_export_refuses_what_does_not_map(tmp_path):
    refusals = {
        "groups": (_difflab_model(base_channels=24), "GroupNorm groups=32 do not divide"),
        "heads": (_difflab_model(preset="small", image_size=16, attn_resolutions=(16, 8), num_heads=2),
                  "head sizes"),
    }
    edm = _difflab_model()
    edm.denoiser.parameterization = EDMParameterization()
    refusals["edm"] = (edm, "continuous noise levels")
    for name, (model, message) in refusals.items():
        with pytest.raises(DifflabError, match=message):
            export_diffusers(model, tmp_path / name)
        assert not (tmp_path / name).exists() and not list(tmp_path.glob(f".{name}*"))


def test_export_cli_and_single_file(tmp_path, one_line):
    run = difflab.train(steps=2, conditional=True, out=str(tmp_path / "runs"), progress=False, sample_every=0,
                        batch_size=16, num_samples=4)
    assert main(["export", str(run), str(tmp_path / "cond"), "--format", "diffusers"]) == 0
    assert diffusers.DDPMPipeline.from_pretrained(tmp_path / "cond").unet.config.num_class_embeds == 11
    one_line(["export", str(run), str(tmp_path / "cond")], "exists and is not empty")
    assert main(["export", str(run), str(tmp_path / "digits.safetensors"), "--format", "safetensors"]) == 0
    one_line(["export", str(run), str(tmp_path / "x.bin"), "--format", "safetensors"], "ending in .safetensors")
    original, single = difflab.load(run, device="cpu"), difflab.load(tmp_path / "digits.safetensors", device="cpu")
    x, sigma, labels = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 50.0]), torch.tensor([0, 5, 9])
    assert single.class_names == original.class_names
    torch.testing.assert_close(single.denoiser(x, sigma, labels), original.denoiser(x, sigma, labels), rtol=0, atol=0)
    assert main(["sample", str(tmp_path / "digits.safetensors"), "--steps", "2", "-n", "1", "--quiet"]) == 0
    assert list((tmp_path / "digits-generated").glob("*.png"))
    with pytest.raises(DifflabError, match="only difflab models"):
        export_file(difflab.load(tmp_path / "cond", device="cpu"), tmp_path / "again.safetensors")


def test_eval_hub_ids_and_missing_extra(tmp_path, monkeypatch, one_line, capsys):
    model = _difflab_model(channels=1, prediction="x0")
    model.config["data"]["name"] = "digits"
    export_diffusers(model, tmp_path / "exported")
    # difflab eval samples a diffusers folder like a run; the features default to those of the dataset in difflab.json
    assert main(["eval", "--fake", str(tmp_path / "exported"), "--real", "digits", "-n", "40", "--steps", "3",
                 "--metrics", "fid",
                 "--json", str(tmp_path / "m.json"), "--quiet"]) == 0
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["features"] == "domain-digits" and result["fid"] > 0 and result["fake"]["nfe"] == 3
    capsys.readouterr()
    # a hub id (owner/name that is no local path) is fetched with huggingface_hub: model_index.json first, then
    # only the files difflab reads (safetensors over .bin, no fp16 variants, no safety checker, no root checkpoint)
    import huggingface_hub
    listing = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
               "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.safetensors",
               "scheduler/scheduler_config.json", "safety_checker/model.safetensors", "v1-5-pruned.safetensors",
               "difflab.json"]
    fetched = []
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo: listing)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: str(tmp_path / "exported" / name))
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kw: fetched.append((repo, kw)) or str(tmp_path / "exported"))
    monkeypatch.chdir(tmp_path)
    hub = difflab.load("someone/ddpm-tiny", device="cpu")
    assert fetched[0][0] == "someone/ddpm-tiny" and hub.shape == (1, 8, 8)
    assert sorted(fetched[0][1]["allow_patterns"]) == sorted(
        ["model_index.json", "difflab.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
         "scheduler/scheduler_config.json"])
    assert main(["sample", "someone/ddpm-tiny", "--steps", "2", "-n", "1", "--quiet"]) == 0
    assert list((tmp_path / "generated" / "someone-ddpm-tiny").glob("*.png"))  # never inside the download cache
    only_bin = [f for f in listing if not f.endswith(".safetensors")]
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo: only_bin)
    difflab.load("someone/ddpm-bin", device="cpu")
    assert "unet/diffusion_pytorch_model.bin" in fetched[-1][1]["allow_patterns"]
    index = json.loads((tmp_path / "exported" / "model_index.json").read_text())
    (tmp_path / "index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: str(tmp_path / "index.json"))
    before = len(fetched)
    one_line(["sample", "someone/kandinsky", "-n", "1"], "unsupported pipeline class 'KandinskyPipeline'")
    assert len(fetched) == before  # refused before any weight was downloaded
    # runs/<name> in a fresh folder is a run not trained yet, never a Hub repository
    (tmp_path / "fresh").mkdir()
    monkeypatch.chdir(tmp_path / "fresh")
    one_line(["sample", "runs/digits", "-n", "1"], "runs/digits")
    assert len(fetched) == before
    monkeypatch.chdir(tmp_path)

    def offline(repo, **kw):  # what huggingface_hub raises without a network
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore")
    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    one_line(["sample", "someone/other", "-n", "1"], "someone/other", "couldn't connect",
             "download the pipeline repository")
    # without the [diffusers] extra: one line naming the pip install
    monkeypatch.setitem(__import__("sys").modules, "diffusers", None)
    one_line(["sample", str(tmp_path / "exported"), "-n", "1"], "pip install 'difflab[diffusers]'")
    one_line(["export", str(tmp_path / "nowhere"), str(tmp_path / "x")], "nowhere")


def test_learned_variance_unet_uses_the_mean_half(tmp_path):
    unet = _ddpm_like_unet(out_channels=6)  # improved DDPM: [eps; variance interpolation]
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(variance_type="learned_range")).save_pretrained(
        tmp_path / "pipe")
    model = difflab.load(tmp_path / "pipe", device="cpu")
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 500.0])
    with torch.no_grad():
        torch.testing.assert_close(model.denoiser.net(x, t), unet(x, t).sample[:, :3], rtol=0, atol=0)
    assert difflab.generate(model, 1, steps=3).shape == (1, 3, 8, 8)


def test_export_is_atomic_and_readable_by_others(tmp_path, monkeypatch):
    import os
    model = _difflab_model(scale_shift=False, prediction="x0")  # DDPM's additive time embedding maps too
    old = os.umask(0o022)
    try:
        export_diffusers(model, tmp_path / "ok")
        export_file(model, tmp_path / "ok.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "ok").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "ok" / "unet" / "config.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "ok.safetensors").stat().st_mode & 0o777 == 0o644
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "ok")
    assert pipe.unet.config.resnet_time_scale_shift == "default"
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    theirs = pipe(batch_size=1, generator=torch.Generator().manual_seed(2), num_inference_steps=5, output_type="np")
    ours = difflab.generate(model, 1, sampler="ddim", steps=5, spacing="leading", clip=False, seed=2)
    assert abs(_as01(ours) - theirs.images).max() < 2e-5

    def half_written(self, folder, **kw):  # a full disk half-way through
        (Path(folder) / "model_index.json").write_text("{}")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(diffusers.DDPMPipeline, "save_pretrained", half_written)
    with pytest.raises(DifflabError, match="No space left on device"):
        export_diffusers(model, tmp_path / "full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok", "ok.safetensors"]
