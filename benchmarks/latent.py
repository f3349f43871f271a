"""Latent diffusion vs pixel diffusion on Fashion-MNIST (resized to 32x32), on this machine.

    python benchmarks/latent.py                    # about 45 minutes on 2 CPU cores
    python benchmarks/latent.py --runs runs/latent-bench --vae-steps 2000 --minutes 6

(a) Two autoencoders trained with the README's demo command (``difflab train-vae``, tiny presets, 2000 steps):
    f = 4 (tiny: 32x32x1 -> 8x8x4) and f = 2 (tiny-f2: -> 16x16x4), each measured by ``difflab eval-vae`` on the
    10,000 test images: PSNR, SSIM and rFID (Fashion-MNIST domain features).
(b) A latent model (tiny U-Net on the f = 4 latents, the README's demo command) and a pixel model (tiny U-Net on
    the 32x32 images) trained for the same wall time: the latent model's time, encoding of the latent cache
    included, is the budget; the pixel model gets as many steps as fit in it (measured speed). Both are judged
    by FID and precision/recall against the 60,000 training images (domain features, 2,000 samples, DDIM 50
    steps), and their sampling speed is timed at the same sampler and NFE.
Writes a table, JSON and sample grids to benchmarks/results/latent_fashion.*.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import difflab
from difflab.evaluation import evaluate, evaluate_autoencoder
from difflab.viz import save_grid

RESULTS = Path(__file__).resolve().parent / "results"
DATA = dict(dataset="fashion-mnist", image_size=32)


def timed(runs: Path, name: str, fn, **settings) -> tuple[Path, float]:
    """Train (or reuse) a run; returns it and its wall time in seconds (recorded beside it)."""
    run, timing = runs / name, runs / name / "wall_time.json"
    if timing.is_file():
        return run, json.loads(timing.read_text())["seconds"]
    start = time.perf_counter()
    fn(out=str(runs), name=name, overwrite=True, progress=False, **DATA, **settings)
    seconds = time.perf_counter() - start
    timing.write_text(json.dumps({"seconds": seconds}))
    return run, seconds


def sampling_speed(run: Path, n: int = 256) -> float:
    """Images per second of DDIM 50 steps (decoding included), best of two."""
    model = difflab.load(run, device="cpu")
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        difflab.generate(model, n, sampler="ddim", steps=50, batch_size=n)
        best = max(best, n / (time.perf_counter() - start))
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=Path("runs/latent-bench"), help="where the runs live (reused)")
    p.add_argument("--vae-steps", type=int, default=2000, help="autoencoder training steps (the demo default)")
    p.add_argument("--steps", type=int, default=2000, help="latent model training steps (the demo default)")
    p.add_argument("-n", type=int, default=2000, help="generated images per FID")
    args = p.parse_args()
    os.environ.setdefault("DIFFLAB_CACHE", str(args.runs / "cache"))  # a cold latent cache: its encoding is timed
    torch.manual_seed(0)
    rows: dict = {"machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}", "vae": {}, "diffusion": {}}

    for name, preset in (("vae-f4", "tiny"), ("vae-f2", "tiny-f2")):
        run, seconds = timed(args.runs, name, difflab.train_vae, preset=preset, steps=args.vae_steps)
        result = evaluate_autoencoder(str(run), "fashion-mnist", n=10_000, split="test", progress=False)
        rows["vae"][name] = {"preset": preset, "train_seconds": seconds, **{k: result[k] for k in (
            "latent_shape", "compression", "psnr", "ssim", "rfid")}}
        print(f"{name}: {result['latent_shape']} PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.4f}, "
              f"rFID {result['rfid']:.3f} ({seconds / 60:.1f} min of training)", flush=True)

    latent, latent_seconds = timed(args.runs, "latent-f4", difflab.train, vae=str(args.runs / "vae-f4"),
                                   steps=args.steps)
    # the pixel model's steps: as many as fit in the latent model's wall time, at its measured speed
    probe, probe_seconds = timed(args.runs, "pixel-probe", difflab.train, steps=30, log_every=10)
    speed = json.loads((probe / "log.jsonl").read_text().splitlines()[-1])["img_per_s"] / 128  # steps/s, warm
    overhead = probe_seconds - 30 / speed  # data loading, the final grid and checkpoint: paid once by any run
    pixel_steps = max(30, int((latent_seconds - overhead) * speed))
    pixel, pixel_seconds = timed(args.runs, "pixel", difflab.train, steps=pixel_steps)
    for name, run, seconds, steps in (("latent (f = 4)", latent, latent_seconds, args.steps),
                                      ("pixel", pixel, pixel_seconds, pixel_steps)):
        result = evaluate("fashion-mnist", str(run), n=args.n, metrics=("fid", "pr"), sampler="ddim", steps=50,
                          seed=0, progress=False)
        rows["diffusion"][name] = {"train_seconds": seconds, "steps": steps, "fid": result["fid"],
                                   "precision": result["precision"], "recall": result["recall"],
                                   "sampling_images_per_s": sampling_speed(run)}
        images = difflab.sample(run, 64, sampler="ddim", steps=50, seed=0, device="cpu")
        RESULTS.mkdir(exist_ok=True)
        save_grid(images * 2 - 1, RESULTS / f"latent_fashion_{name.split()[0]}.png", nrow=8)

    lines = ["(a) autoencoders on the 10,000 test images (Fashion-MNIST 32x32; domain features for rFID)",
             f"{'':<8} {'latent':<10} {'ratio':>6} {'PSNR dB':>8} {'SSIM':>7} {'rFID':>7} {'train min':>10}"]
    for name, r in rows["vae"].items():
        lines.append(f"{name:<8} {'x'.join(map(str, r['latent_shape'])):<10} {r['compression']:>6.1f} "
                     f"{r['psnr']:>8.2f} {r['ssim']:>7.4f} {r['rfid']:>7.3f} {r['train_seconds'] / 60:>10.1f}")
    lines += ["", f"(b) same wall time; FID / precision / recall vs the 60k training images ({args.n} samples, "
              "DDIM 50); sampling at DDIM 50, batch 256, decoding included",
              f"{'':<15} {'steps':>6} {'train min':>10} {'FID':>7} {'prec':>6} {'recall':>7} {'img/s':>7}"]
    for name, r in rows["diffusion"].items():
        lines.append(f"{name:<15} {r['steps']:>6} {r['train_seconds'] / 60:>10.1f} {r['fid']:>7.3f} "
                     f"{r['precision']:>6.3f} {r['recall']:>7.3f} {r['sampling_images_per_s']:>7.1f}")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latent_fashion.txt").write_text(f"{rows['machine']}, {time.strftime('%Y-%m-%d')}\n{table}\n")
    (RESULTS / "latent_fashion.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
