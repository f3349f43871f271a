"""Training and sampling throughput of a U-Net preset, as a table.

    python benchmarks/speed.py                                  # tiny on 8x8 digits shapes, CPU
    python benchmarks/speed.py --preset small --size 28 --batch 256 --device cuda --compile
    python benchmarks/speed.py --preset ddpm-cifar10 --size 32 --channels 3 --batch 128 --device cuda

Training: images/s for the full step (bf16 autocast + channels-last + fused AdamW on CUDA, fp32 on CPU),
after warm-up. Sampling: images/s for DDIM with --sample-steps steps (EMA-free, same network).
"""

from __future__ import annotations

import argparse
import time

import torch

from difflab.denoisers import Denoiser, VPParameterization
from difflab.devices import autocast, resolve_device
from difflab.generate import generate
from difflab.losses import denoising_loss
from difflab.models import build, model_config
from difflab.nn import unet_config
from difflab.schedules import make_schedule


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--size", type=int, default=8)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30, help="timed training steps")
    ap.add_argument("--sample-batch", type=int, default=256)
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    param = VPParameterization(make_schedule("linear", 1000))
    ucfg = unet_config(args.preset, image_size=args.size, in_channels=args.channels)
    model = build(model_config(ucfg, parameterization=param, data={"name": "random"})).to(device)
    net = model.denoiser.net
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    denoiser = Denoiser(torch.compile(net) if args.compile else net, param)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=cuda or None)
    x0 = torch.rand(args.batch, args.channels, args.size, args.size, device=device) * 2 - 1

    def step():
        sigma = param.sample_sigma(args.batch, None, device)
        with autocast(device):
            loss = denoising_loss(denoiser, x0, sigma, torch.randn_like(x0), weight=param.loss_weight(sigma)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    train_ips = args.steps * args.batch / (time.perf_counter() - start)

    net.eval()
    with autocast(device):
        generate(model, min(8, args.sample_batch), steps=2)  # warm-up
        sync(device)
        start = time.perf_counter()
        generate(model, args.sample_batch, steps=args.sample_steps, batch_size=args.sample_batch)
        sync(device)
    sample_ips = args.sample_batch / (time.perf_counter() - start)

    params = sum(p.numel() for p in net.parameters()) / 1e6
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{'device':<28} {'preset':<14} {'params':>8} {'image':>9} {'batch':>6} {'train img/s':>12} {'sample img/s':>13}")
    print(f"{name:<28} {args.preset:<14} {params:>7.2f}M {args.channels}x{args.size}x{args.size:<4} {args.batch:>6} "
          f"{train_ips:>12.0f} {sample_ips:>13.1f}  (DDIM {args.sample_steps} steps)")


if __name__ == "__main__":
    main()
