"""Text-to-image end to end (tutorial §6): the text conditioner (empty prompt, caption dropout, cache), classifier-free
guidance with prompts and negative prompts (exact, on a toy network), training on captioned data in pixel and latent
space, sampling and the prompt-adherence evaluation from the command line."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import difflab
from difflab.cli import main
from difflab.conditioning import TextConditioner, text_cache
from difflab.data.shapes import prompts as shape_prompts
from difflab.denoisers import Denoiser, VPParameterization
from difflab.encoders import PixelEncoder
from difflab.errors import DifflabError
from difflab.generate import default_guidance_scale, guide
from difflab.guidance import classifier_free_guidance
from difflab.models import Model
from difflab.nn.text import HFTextEncoder, ScratchTextEncoder
from difflab.samplers import SAMPLERS
from difflab.schedules import make_schedule
from difflab.training.checkpoint import list_checkpoints

TINY = dict(image_size=16, batch_size=16, log_every=5, sample_every=0, num_samples=4, sample_steps=2, warmup=2,
            model={"base_channels": 16}, progress=False)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def minilm():
    return HFTextEncoder("minilm", max_length=16)


class ToyTextNet(nn.Module):
    """A network whose output is an explicit function of the prompt: x * a + mean of the real tokens' first channel."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.5))

    def forward(self, x, c_noise, cond):
        tokens, mask = cond["tokens"], cond["mask"]
        m = (tokens[..., 0] * mask).sum(1) / mask.sum(1)  # (N,)
        return x * self.a + m[:, None, None, None]


def toy_model(encoder) -> Model:
    denoiser = Denoiser(ToyTextNet(), VPParameterization(make_schedule("linear", 100), "eps"))
    return Model(denoiser, PixelEncoder(), TextConditioner(encoder, 0.1, ["a red circle"]), {})


def test_guidance_with_prompts_is_exact_on_a_toy_network():
    encoder = ScratchTextEncoder.from_texts(["a red circle", "a blue square", "a green triangle"], width=8, layers=1,
                                            heads=2)
    model = toy_model(encoder)
    cond = model.conditioner.encode(["a red circle", "a green triangle"])
    null = model.conditioner.null(2)
    x, sigma = torch.randn(2, 1, 4, 4), torch.tensor([0.7, 2.0])
    d = model.denoiser
    conditional, unconditional = d(x, sigma, cond), d(x, sigma, null)
    assert not torch.equal(conditional, unconditional)
    assert torch.equal(guide(model, guidance_scale=1.0)(x, sigma, cond), conditional)
    assert torch.equal(guide(model, guidance_scale=0.0)(x, sigma, cond), unconditional)
    w = 4.0
    torch.testing.assert_close(guide(model, guidance_scale=w)(x, sigma, cond),
                               unconditional + w * (conditional - unconditional))
    # a negative prompt is CFG with that prompt as the unconditional branch
    negative = model.conditioner.encode(["a blue square"])
    expected = classifier_free_guidance(d, w, null_cond=negative)(x, sigma, cond)
    got = guide(model, guidance_scale=w, negative_prompt="a blue square")(x, sigma, cond)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    neg = d(x, sigma, {k: v.expand(2, *v.shape[1:]) for k, v in negative.items()})
    torch.testing.assert_close(got, neg + w * (conditional - neg))
    with pytest.raises(DifflabError, match="negative prompt"):
        guide(model, negative_prompt="a blue square")


def test_caption_dropout_swaps_in_the_empty_prompt(minilm):
    conditioner = TextConditioner(minilm, dropout=0.5)
    cond = conditioner.encode(["a red circle"] * 400)
    dropped = conditioner.drop(cond, torch.Generator().manual_seed(0))
    empty = conditioner.null(1)
    is_null = (dropped["tokens"] == empty["tokens"]).flatten(1).all(1) & (dropped["mask"] == empty["mask"]).all(1)
    kept = (dropped["tokens"] == cond["tokens"]).flatten(1).all(1)
    assert bool((is_null ^ kept).all()) and 150 < int(is_null.sum()) < 250
    none = TextConditioner(minilm, dropout=0.0).drop(cond, torch.Generator().manual_seed(0))
    assert torch.equal(none["tokens"], cond["tokens"])


def test_the_caption_cache_equals_encoding_on_the_fly_and_is_read_back(minilm, cache_dir):
    texts = ["a red circle", "two blue squares", "a green triangle above a yellow circle", ""]
    first = text_cache(minilm, texts, device="cpu")
    files = list((cache_dir / "text").glob("*.safetensors"))
    assert len(files) == 1
    fly = minilm.encode(texts)
    assert torch.equal(first["tokens"], fly.tokens) and torch.equal(first["mask"], fly.mask)
    again = text_cache(minilm, texts, device="cpu")
    assert torch.equal(again["tokens"], first["tokens"]) and torch.equal(again["mask"], first["mask"])
    files[0].write_bytes(b"damaged")  # a broken cache file is rebuilt, not trusted
    assert torch.equal(text_cache(minilm, texts, device="cpu")["tokens"], fly.tokens)


def test_text_training_samples_resumes_and_reloads(tmp_path):
    run = difflab.train(dataset="shapes", text_encoder="scratch", steps=6, checkpoint_every=3, out=str(tmp_path),
                        name="t2i", **TINY)
    model = difflab.load(run)
    assert model.takes_prompts and model.conditioner.in_unet and len(model.conditioner.prompts) == 8
    images = difflab.sample(model, 2, prompts=["a red circle", "two blue squares"], steps=2, guidance_scale=3.0,
                            negative_prompt="a green square")
    assert images.shape == (4, 3, 16, 16)
    for sampler in SAMPLERS:  # every sampler takes a prompt (adaptive: a coarse tolerance instead of steps)
        options = {"rtol": 0.5, "max_nfe": 12} if sampler == "adaptive" else {"steps": 3}
        assert torch.isfinite(difflab.sample(model, 1, prompts="a red circle", sampler=sampler, guidance_scale=2.0,
                                             **options)).all()
    # the prompts are encoded once per call, not at every step or in each half of guidance
    calls = []
    encoder = model.conditioner.encoder
    encoder.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    difflab.sample(model, 3, prompts=["a red circle", "two blue squares"], steps=6, guidance_scale=3.0, batch_size=2)
    assert sorted(calls) == [1, 6]  # the empty prompt (the null condition) once, the six images' prompts once
    # resuming is exact: 6 steps in one go equal 3 + 3
    half = difflab.train(dataset="shapes", text_encoder="scratch", steps=3, out=str(tmp_path), name="half", **TINY)
    difflab.train(resume=half, steps=6, progress=False)
    a, b = (list_checkpoints(r)[-1] / "ema.safetensors" for r in (run, half))
    from safetensors.torch import load_file

    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert any(k.startswith("text_encoder.") for k in ta)  # the from-scratch encoder travels with the U-Net


def test_frozen_minilm_on_captions_from_templates_and_latent_space(tmp_path):
    import diffusers

    run = difflab.train(dataset="digits", text_encoder="minilm", caption_templates="the digit {class}|a {class}",
                        steps=2, out=str(tmp_path), name="digits-text", **{**TINY, "image_size": 8})
    config = json.loads((list_checkpoints(run)[-1] / "config.json").read_text())
    assert config["conditioner"]["encoder"]["source"] == "minilm" and config["unet"]["context_dim"] == 384
    assert config["conditioner"]["prompts"][0] == "the digit 0"
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
                                  layers_per_block=1, latent_channels=2, norm_num_groups=8)
    vae.save_pretrained(tmp_path / "vae")
    latent = difflab.train(dataset="shapes", text_encoder="minilm", vae=str(tmp_path / "vae"), steps=2,
                           out=str(tmp_path), name="latent-text", **TINY)
    images = difflab.sample(latent, 2, prompts="a red circle", steps=2, guidance_scale=3.0)
    assert images.shape == (2, 3, 16, 16)


def test_sample_and_eval_from_the_command_line(tmp_path, capsys, one_line):
    run = difflab.train(dataset="shapes", text_encoder="scratch", steps=2, out=str(tmp_path), name="cli", **TINY)
    (tmp_path / "prompts.txt").write_text("\n".join(shape_prompts("seen", 3, seed=0)) + "\n")
    assert main(["sample", str(run), "--prompts", str(tmp_path / "prompts.txt"), "--prompt", "a red circle", "-n", "2",
                 "--steps", "2", "--negative-prompt", "a blue square", "--individual", "--quiet",
                 "--out", str(tmp_path / "out")]) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len([n for n in names if n.endswith(".png")]) == 1 + 8  # the grid and 4 prompts x 2 images
    listing = next(p for p in (tmp_path / "out").iterdir() if p.name.endswith("_prompts.txt")).read_text()
    assert listing.count("a red circle") == 2
    capsys.readouterr()
    assert main(["eval", "--prompts", str(tmp_path / "prompts.txt"), "--fake", str(run), "--per-prompt", "2",
                 "--steps", "2", "--quiet", "--json", str(tmp_path / "adherence.json")]) == 0
    table = capsys.readouterr().out
    for category in ("present", "count", "colour", "attribution", "position", "overall"):
        assert category in table
    assert json.loads((tmp_path / "adherence.json").read_text())["per_prompt"] == 2
    one_line(["sample", str(run), "--class", "3"], "text-to-image model")
    one_line(["eval", "--prompts", str(tmp_path / "nothing.txt"), "--fake", str(run)], "nothing.txt")
    (tmp_path / "bad.txt").write_text("a purple elephant\n")
    one_line(["eval", "--prompts", str(tmp_path / "bad.txt"), "--fake", str(run)], "elephant")
    one_line(["train", "--text-encoder", "scratch", "--conditional"], "not both")
    one_line(["train", "--dataset", "fashion-mnist", "--caption-templates", "a photo"], "--text-encoder")
    one_line(["train", "--text-encoder", "scratch", "--caption-dropout", "1.5"], "caption-dropout")


@pytest.mark.slow
def test_a_tiny_text_unet_learns_to_paint_the_asked_colour(tmp_path):
    """End to end on CPU (about 1.5 min): 300 steps on 16x16 shapes with the frozen MiniLM, then single-object
    prompts of every seen (colour, shape) pair. The checker finds the asked colour far more often than the
    complementary one (red <-> cyan, green <-> magenta, blue <-> yellow) in the same images: the control that
    says how often a colour shows up by chance."""
    from difflab.data.shapes import COLOURS, DEFAULT_HELD_OUT
    from difflab.metrics.adherence import check_image

    run = difflab.train(dataset="shapes", text_encoder="minilm", image_size=16, steps=300, batch_size=32, warmup=50,
                        ema_decay=0.99, sample_every=0, log_every=50, num_samples=8, out=str(tmp_path), name="learn",
                        progress=False)
    names = list(COLOURS)
    asked = [f"a {c} {s}" for c in names for s in ("circle", "square", "triangle") if (c, s) not in DEFAULT_HELD_OUT]
    images = difflab.sample(run, 4, prompts=asked, steps=20, guidance_scale=3.0)
    pixels = (images * 255).round().byte().permute(0, 2, 3, 1).numpy()
    hits = control = 0
    for image, prompt in zip(pixels, [p for p in asked for _ in range(4)]):
        colour = prompt.split()[1]
        other = names[(names.index(colour) + len(names) // 2) % len(names)]  # the complementary colour
        hits += bool(check_image(image, prompt)["colour"])
        control += bool(check_image(image, prompt.replace(colour, other))["colour"])
    n = len(pixels)
    assert hits / n >= 0.45 and hits / n >= control / n + 0.2, (hits / n, control / n)


def test_torchrun_trains_a_text_model_like_one_process(tmp_path):
    """2 ranks x 8 images = 1 process x 16 images, for the from-scratch encoder inside the U-Net (DDP must see its
    parameters used) and with caption dropout drawn from the shared random stream."""
    import os
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["train", "--dataset", "shapes", "--image-size", "16", "--text-encoder", "scratch", "--steps", "3",
            "--batch-size", "16", "--device", "cpu", "--log-every", "1", "--checkpoint-every", "3", "--warmup", "2",
            "--sample-every", "0", "--num-samples", "4", "--sample-steps", "2", "--quiet"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(port), "-m", "difflab"]
    done = subprocess.run(torchrun + args + ["--out", str(tmp_path / "ddp")], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    for which in ("model", "ema"):
        a, b = (load_file(tmp_path / r / "shapes" / "checkpoints" / "step_0000003" / f"{which}.safetensors")
                for r in ("ddp", "one"))
        diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
        assert diff.max() < 2e-4 and (diff > 1e-5).float().mean() < 1e-3, (which, diff.max())


def test_a_text_model_distils_with_guidance_folded_in(tmp_path):
    teacher = difflab.train(dataset="shapes", text_encoder="scratch", steps=2, out=str(tmp_path), name="text", **TINY)
    run = difflab.distill(teacher, method="consistency", guidance_scale=2.0, updates=2, convert_updates=1,
                          grid_points=4, batch_size=16, num_samples=4, progress=False, out=str(tmp_path))
    model = difflab.load_model(run, device="cpu")
    assert model.takes_prompts and model.distillation["guidance_scale"] == 2.0
    assert default_guidance_scale(model) == 1.0  # guidance is in the student
    images = difflab.sample(model, 2, prompts=["a red circle"])
    assert images.shape == (2, 3, 16, 16)
    with pytest.warns(UserWarning, match="folded into this distilled model"):
        difflab.sample(model, 1, prompts=["a red circle"], guidance_scale=3.0)
