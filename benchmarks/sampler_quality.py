"""Sample quality against network evaluations (NFE) for every sampler, as a table and a plot.

    python benchmarks/sampler_quality.py runs/digits                       # CPU: ~10 min for n=1000
    python benchmarks/sampler_quality.py runs/fmnist -n 5000 --device cuda

Quality is the Frechet distance between Gaussian fits of generated and real images in pixel space
(a simple feature statistic; the metrics issue's FID will replace it). The reference is the 1000-step
DDPM chain; the last column says at which NFE each sampler first comes within 10% of that reference.
Writes sampler_quality.png and sampler_quality.json next to the run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import linalg

import difflab
from difflab.data import load_dataset, to_model_range
from difflab.devices import autocast
from difflab.samplers import SAMPLERS


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)) of Gaussian fits (Heusel et al. 2017, eq. 6)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eye = 1e-6 * np.eye(len(ca))  # blank border pixels make the covariances singular
    covmean = linalg.sqrtm((ca + eye) @ (cb + eye)).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * covmean))


def steps_for(name: str, nfe: int) -> int | None:
    """Grid steps that spend about ``nfe`` evaluations (None when the sampler cannot get that low)."""
    cost = SAMPLERS[name].nfe
    steps = max((s for s in range(1, nfe + 1) if cost(s) <= nfe), default=None)
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("-n", type=int, default=1000, help="images per setting")
    ap.add_argument("--nfe", default="5,10,20,50,100", help="NFE budgets (the 1000-step DDPM reference is always run)")
    ap.add_argument("--samplers", default=",".join(n for n in SAMPLERS if n != "ddpm"))
    ap.add_argument("--spacing", default="karras")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=10_000)
    args = ap.parse_args()

    model = difflab.load_model(args.run, device=args.device)
    data = load_dataset(model.config["data"]["name"], image_size=model.image_shape[1], channels=model.image_shape[0], progress=False)
    real = to_model_range(data.images).flatten(1).numpy()

    def quality(sampler: str, steps: int, spacing: str, **options) -> tuple[float, int]:
        stats: dict = {}
        with autocast(model.device):
            images = difflab.generate(model, args.n, sampler=sampler, steps=steps, spacing=spacing, seed=args.seed,
                                      stats=stats, **options)
        return frechet_distance(images.flatten(1).cpu().double().numpy(), real), stats["nfe"]

    reference, _ = quality("ddpm", model.parameterization.default_steps("ddpm"), "uniform")
    budgets = [int(b) for b in args.nfe.split(",")]
    results = {"reference_ddpm_1000": reference, "samplers": {}}
    print(f"reference: DDPM, 1000 steps: Frechet distance {reference:.4f} (pixel space, n={args.n})")
    print("each cell: Frechet distance @ NFE used")
    for name in args.samplers.split(","):
        row = {}
        if SAMPLERS[name].nfe is None:  # adaptive: sweep the tolerance, record the evaluations it used
            for rtol in (0.5, 0.2, 0.1, 0.05, 0.02, 0.01):
                fd, nfe = quality(name, None, args.spacing, rtol=rtol, atol=rtol / 10, max_nfe=max(budgets))
                row[nfe] = fd
        for budget in budgets if SAMPLERS[name].nfe is not None else []:
            steps = steps_for(name, budget)
            if steps is not None:
                fd, nfe = quality(name, steps, args.spacing)
                row[nfe] = fd
        good = [nfe for nfe, fd in sorted(row.items()) if fd <= 1.1 * reference]
        results["samplers"][name] = {str(k): v for k, v in row.items()}
        cells = "".join(f"{row[nfe]:>9.4f} @{nfe:<4}" for nfe in sorted(row))
        print(f"{name:<16}{cells}  within 10% of DDPM-1000 from NFE {good[0] if good else '> ' + str(max(row))}")

    out = Path(args.run)
    (out / "sampler_quality.json").write_text(json.dumps(results, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for name, row in results["samplers"].items():
        xs = sorted(int(k) for k in row)
        ax.plot(xs, [row[str(x)] for x in xs], marker="o", label=name)
    ax.axhline(reference, color="k", ls="--", lw=1, label="DDPM 1000 steps")
    ax.axhline(1.1 * reference, color="k", ls=":", lw=1, label="+10%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel("Frechet distance to real data (pixels)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "sampler_quality.png")
    print(f"wrote {out / 'sampler_quality.png'} and {out / 'sampler_quality.json'}")


if __name__ == "__main__":
    main()
