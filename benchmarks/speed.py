"""Training and sampling speed, difflab against diffusers' UNet2DModel of the same configuration, in one run.

    python benchmarks/speed.py                        # CPU: tiny (8x8) and small (28x28), fp32
    python benchmarks/speed.py --device cuda          # GPU: ddpm-cifar10 (32x32x3), training at batch 128 and 512,
                                                      # sampling at 256; bf16 and compiled (the issue's comparison)
    python benchmarks/speed.py --device cuda --modes fp32,bf16,compiled,graphs --batches 64,128,256,512

Both libraries get the same network: the diffusers U-Net is built from difflab's preset with `difflab export`'s
mapping (`export.unet2d_config`) and the same weights, so it computes the same function (checked before timing).

* training: one optimizer step of the eps-prediction loss at batch B -- noise, forward, backward, gradient clipping,
  fused AdamW, EMA. difflab: the step `difflab train` runs (its loss and parameterization, and training/step.py's
  Updater: the device-side non-finite gate, the gated EMA, one host read every 50 steps); diffusers: the loop of
  its train_unconditional example (`DDPMScheduler.add_noise`, `F.mse_loss`, `clip_grad_norm_`,
  `EMAModel(foreach=True)`). Both on the same fixed batch of images already on the device.
* sampling: DDIM with 50 steps and DPM-Solver++(2M) with 20 at batch B. difflab: `difflab.generate`; diffusers:
  the scheduler loop of its pipelines (`DDIMScheduler`, `DPMSolverMultistepScheduler`).
* modes: fp32; bf16 (autocast); compiled (bf16 + `torch.compile` of the network; difflab samples through
  `generate(compile=True)`); graphs (bf16 + `torch.compile(mode="reduce-overhead")`: CUDA graphs). Both networks
  take difflab's memory format (channels-last on a GPU, NCHW on a CPU: `devices.memory_format`).

Timing: both libraries are warmed up, then timed in alternating rounds (the median round counts), so a machine
whose speed drifts during the run moves both alike. Reported: images/s after warm-up (the warm-up time is reported
too: it holds the compilation), peak memory (CUDA),
and model FLOP utilisation (FLOPs of the network counted by torch's FlopCounterMode, training = 3x forward, over the
GPU's dense bf16 peak; on CPU the achieved GFLOP/s instead). One table, one JSON in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import difflab
from difflab.denoisers import Denoiser, VPParameterization
from difflab.devices import memory_format, resolve_device
from difflab.encoders import PixelEncoder
from difflab.export import unet2d_config, unet2d_state
from difflab.losses import denoising_loss
from difflab.models import Model, model_config
from difflab.nn import UNet, unet_config
from difflab.schedules import make_schedule
from difflab.training.step import Updater

RESULTS = Path(__file__).resolve().parent / "results"
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}  # dense bf16 FLOP/s


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def precision(device: torch.device, mode: str):
    return (torch.autocast(device.type, dtype=torch.bfloat16) if mode != "fp32" else contextlib.nullcontext())


def forward_flops(net, x, t) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, t)
    return counter.get_total_flops() / x.shape[0]


def timed_pair(fns: dict, device: torch.device, rounds: int, calls: int, warmups: int) -> dict:
    """{name: (seconds per call, warm-up seconds, peak GB)} for each function of ``fns``, timed in alternation:
    ``rounds`` rounds of ``calls`` calls of each, the median round counts, so a machine that speeds up or slows
    down during the run (a CPU's clocks, another process) moves both sides alike. The warm-up holds compilation
    and autotuning."""
    gpu = device.type == "cuda"
    warm, times, peak = {}, {name: [] for name in fns}, {name: 0.0 for name in fns}
    for name, fn in fns.items():
        start = time.perf_counter()
        for _ in range(warmups):
            fn()
        sync(device)
        warm[name] = time.perf_counter() - start
    for _ in range(rounds):
        for name, fn in fns.items():
            if gpu:
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - start) / calls)
            if gpu:
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device) / 2**30)
    return {name: (statistics.median(times[name]), warm[name], peak[name] if gpu else None) for name in fns}


def build(args, device, mode):
    """The difflab model and the diffusers UNet2DModel with the same weights, in the mode's memory format."""
    import diffusers

    torch.manual_seed(0)
    config = unet_config(args.preset, image_size=args.size, in_channels=args.channels)
    net = UNet(config)
    with torch.no_grad():  # random weights everywhere: zero-initialised layers would make both trivially equal
        for p in net.parameters():
            p.normal_(0, 0.02)
    unet = diffusers.UNet2DModel.from_config({k: v for k, v in unet2d_config(config).items() if k != "_class_name"})
    unet.load_state_dict(unet2d_state(net.state_dict()))
    param = VPParameterization(make_schedule("linear", 1000))
    model = Model(Denoiser(net, param), PixelEncoder(), None,
                  model_config(config, parameterization=param, data={"name": "random"}))
    fmt = memory_format(device)  # difflab's rule (channels-last on a GPU, NCHW on a CPU), for both
    net, unet = net.to(device, memory_format=fmt), unet.to(device, memory_format=fmt)
    x, t = torch.randn(4, args.channels, args.size, args.size, device=device), torch.tensor([10, 300, 600, 990],
                                                                                              device=device)
    with torch.no_grad():
        gap = float((net.eval()(x, t) - unet.eval()(x, t).sample).abs().max())
    assert gap < 1e-3, f"the two networks differ by {gap}"
    return model, net, unet, param


def compile_fn(module, mode: str):
    """The mode's compilation: none (fp32, bf16), torch.compile (compiled) or with CUDA graphs (graphs)."""
    if mode == "compiled":
        return torch.compile(module)
    if mode == "graphs":
        return torch.compile(module, mode="reduce-overhead")
    return module


def train_step_difflab(model, net, param, device, mode, batch, channels, size):
    """The step `difflab train` runs: its loss and parameterization, and its Updater (clip, the device-side
    non-finite gate, fused AdamW, the gated EMA), checked (one host read) every 50 steps like its log rows."""
    denoiser = Denoiser(compile_fn(net, mode), param)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    updater = Updater(net, {"ema": ema}, {"ema": 0.9999}, opt, grad_clip=1.0, updates=10_000,
                      lr_schedule=lambda updates: torch.full_like(updates, 1e-4))
    x0 = torch.rand(batch, channels, size, size, device=device) * 2 - 1
    x0 = x0.contiguous(memory_format=memory_format(device))
    g = torch.Generator(device).manual_seed(0)
    done = [0]
    net.train()

    def step():
        sigma = param.sample_sigma(batch, g, device)
        with precision(device, mode):
            loss = denoising_loss(denoiser, x0, sigma, torch.randn(x0.shape, generator=g, device=device),
                                  weight=param.loss_weight(sigma)).mean()
        updater.step(loss, {})
        done[0] += 1
        if done[0] % 50 == 0:
            updater.check()
    return step


def train_step_diffusers(unet, device, mode, batch, channels, size):
    import diffusers
    from diffusers.training_utils import EMAModel

    compiled = compile_fn(unet, mode)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True)
    ema = EMAModel(unet.parameters(), decay=0.9999, foreach=True)
    x0 = torch.rand(batch, channels, size, size, device=device) * 2 - 1
    unet.train()

    def step():
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,), device=device)
        x_t = scheduler.add_noise(x0, noise, t)
        with precision(device, mode):
            loss = F.mse_loss(compiled(x_t, t).sample.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)  # as its train_unconditional.py example
        opt.step()
        ema.step(unet.parameters())
    return step


def sample_difflab(model, net, device, mode, batch, sampler, steps):
    model.denoiser.eval()
    if mode == "graphs":
        model = Model(Denoiser(compile_fn(net, mode), model.parameterization), model.encoder, None, model.config)

    def run():
        with precision(device, mode):
            difflab.generate(model, batch, sampler=sampler, steps=steps, batch_size=batch, clip=False,
                             compile=mode == "compiled")
    return run


def sample_diffusers(unet, device, mode, batch, channels, size, sampler, steps):
    import diffusers

    compiled = compile_fn(unet.eval(), mode)
    cls = diffusers.DDIMScheduler if sampler == "ddim" else diffusers.DPMSolverMultistepScheduler
    scheduler = cls(num_train_timesteps=1000, clip_sample=False) if sampler == "ddim" else cls(num_train_timesteps=1000)

    @torch.no_grad()
    def run():
        scheduler.set_timesteps(steps, device=device)
        x = torch.randn(batch, channels, size, size, device=device)
        with precision(device, mode):
            for t in scheduler.timesteps:
                x = scheduler.step(compiled(x, t).sample, t, x).prev_sample
    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default=None, help="one preset (default: tiny at 8x8 and small at 28x28 on a CPU, "
                    "ddpm-cifar10 at 32x32x3 on a GPU)")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--channels", type=int, default=None)
    ap.add_argument("--batches", default=None, help="comma-separated training batch sizes (default: 64,128 for tiny, "
                    "64 for small, 128,512 on a GPU)")
    ap.add_argument("--sample-batches", default=None, help="comma-separated sampling batch sizes (default: the "
                    "training ones; 256 on a GPU)")
    ap.add_argument("--modes", default=None, help="comma-separated: fp32, bf16, compiled, graphs (default: fp32 on a "
                    "CPU, bf16,compiled on a GPU)")
    ap.add_argument("--repeats", type=int, default=20, help="timed training steps per row and library (default: 20)")
    ap.add_argument("--rounds", type=int, default=10, help="... in this many alternating rounds, the median counts "
                    "(default: 10)")
    ap.add_argument("--sample-rounds", type=int, default=None, help="alternating rounds of sampling, one call each "
                    "(default: 3; 1 for presets above tiny on a CPU)")
    ap.add_argument("--no-sampling", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None, help="where to write the JSON (default: benchmarks/results/speed_<device>)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    if args.preset:
        setups = [(args.preset, args.size or 32)]
    else:
        setups = [("ddpm-cifar10", 32)] if gpu else [("tiny", 8), ("small", 28)]
    args.channels = args.channels or (3 if gpu and not args.preset else 1)
    args.modes = args.modes or ("bf16,compiled" if gpu else "fp32")
    sample_rounds = args.sample_rounds
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    rows = []
    out = Path(args.json) if args.json else RESULTS / f"speed_{device.type}.json"
    meta = {"date": time.strftime("%Y-%m-%d"), "device": name, "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "peak_bf16_flop_per_s": peak}

    def write(rows) -> Path:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        return out

    header = (f"{'preset':<13} {'batch':>5} {'mode':<9} {'what':<16} {'difflab img/s':>13} {'diffusers img/s':>15} "
              f"{'ratio':>6} {'warm-up s':>10} {'peak GB':>8} {'MFU/GFLOPs':>11}")
    print(f"{name}; torch {torch.__version__}\n{header}", flush=True)
    for preset, size in setups:
        for mode in args.modes.split(","):
            a = argparse.Namespace(preset=preset, size=size, channels=args.channels)
            model, net, unet, param = build(a, device, mode)
            flops = forward_flops(net, torch.randn(2, args.channels, size, size, device=device),
                                  torch.tensor([1, 2], device=device))
            args.sample_rounds = sample_rounds or (1 if not gpu and preset != "tiny" else 3)
            train_batches = args.batches or ("128,512" if gpu else "64,128" if preset == "tiny" else "64")
            cases = [(batch, "train", 3 * flops,
                      lambda b=batch: train_step_difflab(model, net, param, device, mode, b, args.channels, size),
                      lambda b=batch: train_step_diffusers(unet, device, mode, b, args.channels, size), args.repeats)
                     for batch in (int(b) for b in train_batches.split(","))]
            sample_batches = args.sample_batches or ("256" if gpu and not args.batches else train_batches)
            for batch in () if args.no_sampling else (int(b) for b in sample_batches.split(",")):
                for sampler, steps in (("ddim", 50), ("dpmpp_2m", 20)):
                    cases.append((batch, f"sample {sampler}-{steps}", steps * flops,
                                  lambda s=sampler, n=steps, b=batch: sample_difflab(model, net, device, mode, b, s, n),
                                  lambda s=sampler, n=steps, b=batch: sample_diffusers(unet, device, mode, b,
                                                                                       args.channels, size, s, n), 1))
            for batch, what, flops_per_image, ours, theirs, repeats in cases:
                train = what == "train"
                timing = timed_pair({"difflab": ours(), "diffusers": theirs()}, device,
                                    rounds=args.rounds if train else args.sample_rounds,
                                    calls=max(1, repeats // args.rounds) if train else 1, warmups=2 if train else 1)
                result = {library: {"images_per_s": batch / seconds, "warmup_s": warm, "peak_gb": memory,
                                    "flop_per_s": flops_per_image * batch / seconds}
                          for library, (seconds, warm, memory) in timing.items()}
                ours_r, theirs_r = result["difflab"], result["diffusers"]
                use = ours_r["flop_per_s"] / peak if peak else None
                rows.append({"preset": preset, "size": size, "batch": batch, "mode": mode, "what": what,
                             "forward_gflop_per_image": flops / 1e9, **result,
                             "ratio": ours_r["images_per_s"] / theirs_r["images_per_s"], "mfu": use})
                mem = f"{ours_r['peak_gb']:.2f}" if ours_r["peak_gb"] is not None else "-"
                util = f"{100 * use:.1f}%" if use is not None else f"{ours_r['flop_per_s'] / 1e9:.1f}"
                print(f"{preset:<13} {batch:>5} {mode:<9} {what:<16} {ours_r['images_per_s']:>13.1f} "
                      f"{theirs_r['images_per_s']:>15.1f} {rows[-1]['ratio']:>6.2f} {ours_r['warmup_s']:>10.1f} "
                      f"{mem:>8} {util:>11}", flush=True)
                write(rows)  # after every row: a run cut short keeps what it measured
    print(f"-> {write(rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
