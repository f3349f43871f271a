"""The fast paths of issue 16 against the plain ones: samplers that never read the device back (run here on
PyTorch's "meta" device, which has no data to read and refuses to mix with host tensors as a GPU does), the
guided batch built once, bf16 sampling against float32, the GPU batch size rule; and -- marked, run on the GPU by
benchmarks/gpu_check.sh -- torch.compile against eager for training and sampling, and no synchronisation inside a
CUDA training step or sampling loop."""

from __future__ import annotations

import json

import pytest
import torch

import difflab
from difflab.conditioning import ClassConditioner
from difflab.denoisers import Denoiser, VPParameterization
from difflab.encoders import PixelEncoder
from difflab.generate import fill_batch
from difflab.models import Model, model_config
from difflab.nn import UNet, unet_config
from difflab.samplers import SAMPLERS
from difflab.schedules import make_schedule
from difflab.tasks import DiffusionTask
from difflab.training import loop
from difflab.training.step import Updater

FIXED_GRID = [name for name, info in SAMPLERS.items() if info.nfe is not None]  # adaptive steps read their error
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA check: run by benchmarks/gpu_check.sh")


def tiny_model(device="cpu", classes: int | None = 3, seed: int = 0) -> Model:
    torch.manual_seed(seed)
    config = unet_config("tiny", image_size=8, in_channels=1, base_channels=16, num_classes=classes)
    net = UNet(config).eval()
    with torch.no_grad():  # random weights everywhere (zero-initialised output layers would make every path agree)
        for p in net.parameters():
            p.normal_(0, 0.05)
    param = VPParameterization(make_schedule("linear", 1000))
    conditioner = ClassConditioner(["a", "b", "c"], 0.1) if classes else None
    return Model(Denoiser(net.to(device), param), PixelEncoder(), conditioner,
                 model_config(config, parameterization=param, conditioner=conditioner,
                              data={"name": "random", "channels": 1, "image_size": 8}))


@pytest.mark.parametrize("sampler", FIXED_GRID)
def test_samplers_never_read_the_device(sampler):
    """Every sampler, through generate() with classifier-free guidance, on tensors that cannot be read back: any
    branch on a device value (``if x.isnan().any()``, ``float(sigma_on_gpu)``) or a host tensor mixed into a device
    op would raise. The sigma grid stays on the host, where reading it is free."""
    model = tiny_model("meta")
    images = difflab.generate(model, 4, sampler=sampler, steps=4, cond=torch.tensor([0, 1, 2, 0]),
                              guidance_scale=2.0, clip=True)
    assert images.device.type == "meta" and images.shape == (4, 1, 8, 8)


def test_guided_sampling_builds_its_doubled_batch_once():
    """Classifier-free guidance: one network call per step on 2N images, and the conditions of the doubled batch
    are the same tensor at every step (built once per batch, not concatenated and copied every step)."""
    model = tiny_model()
    calls = []
    real = model.denoiser.net.forward

    def spy(x, t, cond=None):
        calls.append((x.shape[0], cond))
        return real(x, t, cond)

    model.denoiser.net.forward = spy
    difflab.generate(model, 6, steps=5, cond=torch.tensor([0, 1, 2, 0, 1, 2]), guidance_scale=3.0, batch_size=3)
    assert [n for n, _ in calls] == [6] * 10  # 2 batches x 5 steps, 2 x 3 images each
    for batch in (calls[:5], calls[5:]):
        assert all(c is batch[0][1] for _, c in batch)
    assert calls[0][1] is not calls[5][1]
    assert calls[0][1].tolist() == [0, 1, 2, 3, 3, 3]  # the conditional half, then the null class


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_bf16_sampling_matches_float32(sampler):
    """The network in bf16 autocast (the GPU default), the sampler arithmetic in float32: the images agree with
    float32 sampling to bf16 precision (measured: 0.017 of the [-1, 1] range at most)."""
    model = tiny_model(classes=None)
    exact = difflab.generate(model, 8, sampler=sampler, steps=10, clip=False)
    with torch.autocast("cpu", torch.bfloat16):
        fast = difflab.generate(model, 8, sampler=sampler, steps=10, clip=False)
    assert fast.dtype == torch.float32
    assert float((fast - exact).abs().max()) < 0.05
    assert float((fast - exact).abs().mean()) < 0.01


def test_gpu_batch_fills_seventy_percent_of_free_memory():
    mib = 2**20
    assert fill_batch(per_image_bytes=10 * mib, free_bytes=80 * 1024 * mib, guided=False, n=50_000) == 4096
    assert fill_batch(10 * mib, 8 * 1024 * mib, False, 50_000) == 512  # 0.7 * 8 GiB / 10 MiB = 573
    assert fill_batch(10 * mib, 8 * 1024 * mib, True, 50_000) == 256   # twice the images per call
    assert fill_batch(10 * mib, 8 * 1024 * mib, False, 100) == 128     # no larger than n needs
    assert fill_batch(10 * mib, 8 * 1024 * mib, False, 1) == 1
    assert fill_batch(1024 * mib, 1024 * mib, False, 50_000) == 1      # too little memory: one at a time


def test_a_compiled_network_stays_out_of_copies_and_state_dicts():
    """generate(compile=True) keeps the compiled network beside the original (torch.compile wraps lazily: nothing is
    compiled here): not a submodule, not in the state dict, not carried by a deepcopy (which compiles afresh)."""
    import copy

    from difflab.generate import compiled

    model = tiny_model(classes=None)
    fast = compiled(model.denoiser)
    assert compiled(model.denoiser).net is fast.net  # once per network
    net = model.denoiser.net
    assert list(net.state_dict()) == list(tiny_model(classes=None).denoiser.net.state_dict())
    twin = copy.deepcopy(net)
    assert twin.__dict__.get("_difflab_compiled") is None
    assert compiled(Denoiser(twin, model.parameterization)).net is not fast.net


def test_compiling_by_default_never_fails_a_run(monkeypatch):
    """Compilation that is only a default (a GPU's training step, a long sampling job) falls back to eager where
    torch cannot compile; asked for explicitly, a failure is the user's to see."""
    import torch._dynamo

    from difflab.devices import compile_module

    monkeypatch.setattr(torch._dynamo.config, "suppress_errors", False)
    compile_module(torch.nn.Linear(2, 2), asked=True)
    assert torch._dynamo.config.suppress_errors is False
    compile_module(torch.nn.Linear(2, 2), asked=False)
    assert torch._dynamo.config.suppress_errors is True


# -- torch.compile: minutes on a CPU, so run on the GPU by benchmarks/gpu_check.sh (pytest --run-compile) --------

@pytest.mark.compile
def test_compiled_training_follows_eager(tmp_path):
    """The compiled training step (the GPU default) against eager: the same loss trajectory and weights to float
    tolerance over 60 steps (compiled kernels reorder float arithmetic)."""
    settings = dict(progress=False, batch_size=32, sample_every=0, warmup=2, steps=60, log_every=20,
                    checkpoint_every=60, model={"base_channels": 16}, device=DEVICE, precision="fp32")
    losses = {}
    for compiled in (False, True):
        run = loop.train(DiffusionTask, compile=compiled, out=str(tmp_path), name=f"c{compiled}", **settings)
        losses[compiled] = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
    for a, b in zip(losses[False], losses[True]):
        assert abs(a - b) < 1e-3 * a, losses


@pytest.mark.compile
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_compiled_sampling_matches_eager(sampler):
    model = tiny_model(DEVICE, classes=None)
    eager = difflab.generate(model, 8, sampler=sampler, steps=10, clip=False, compile=False)
    compiled = difflab.generate(model, 8, sampler=sampler, steps=10, clip=False, compile=True)
    again = difflab.generate(model, 8, sampler=sampler, steps=10, clip=False, compile=True)  # the cached graph
    assert float((compiled - eager).abs().max()) < 1e-4
    assert torch.equal(compiled, again)
    assert not any("compiled" in k for k in model.denoiser.net.state_dict())


# -- CUDA only: the synchronisation debugger refuses any host wait ---------------------------------------------

@needs_cuda
def test_a_cuda_training_step_never_synchronises(tmp_path, monkeypatch):
    """torch.cuda's sync debug mode raises at any operation that makes the host wait for the GPU: on for the batch,
    the loss and the update of every step, off for the checks."""
    calls = {"step": 0}

    def strict(fn):
        def wrapped(*args, **kwargs):
            if calls["step"] < 2:  # the first steps fill caches (tables copied to the device once)
                return fn(*args, **kwargs)
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return wrapped

    def counted(fn):
        def wrapped(*args, **kwargs):
            result = strict(fn)(*args, **kwargs)
            calls["step"] += 1
            return result
        return wrapped

    class Strict(DiffusionTask):
        batch = strict(DiffusionTask.batch)
        loss = strict(DiffusionTask.loss)

    monkeypatch.setattr(Updater, "step", counted(Updater.step))
    run = loop.train(Strict, steps=20, log_every=10, progress=False, batch_size=32, sample_every=0, warmup=2,
                     conditional=True, hflip=True, compile=False, model={"base_channels": 16}, device="cuda",
                     out=str(tmp_path), name="strict")
    assert len((run / "log.jsonl").read_text().splitlines()) == 2


@needs_cuda
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "heun", "ddpm"])
def test_cuda_sampling_never_synchronises(sampler):
    from difflab.generate import guide
    from difflab.samplers import get_sampler

    model = tiny_model("cuda")
    cond = torch.tensor([0, 1, 2, 0], device="cuda")
    den = guide(model, guidance_scale=2.0)
    sigmas = model.parameterization.sampling_sigmas(10, "uniform", 7.0)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    get_sampler(sampler)(den, torch.randn(4, 1, 8, 8, device="cuda"), sigmas, cond=cond, generator=gens)  # caches
    x = torch.randn(4, 1, 8, 8, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        get_sampler(sampler)(den, x, sigmas, cond=cond, generator=gens)
    finally:
        torch.cuda.set_sync_debug_mode("default")
