"""EDM training vs the default eps-prediction DDPM on the bundled digits, side by side: the same network, data,
steps, batch, optimizer and EMA -- only the parameterization differs -- so the two runs take the same wall time.

    python benchmarks/edm_digits.py                 # trains both (about 4 minutes each on 2 CPU cores), then measures
    python benchmarks/edm_digits.py --runs runs/bench   # reuses runs/bench/digits-eps and digits-edm if they exist

Each model samples with several samplers at about 10, 18 and 35 network evaluations (NFE); every row is judged by
the shipped digits domain classifier (FID and precision/recall against the 1,797 real digits, `difflab eval`'s
numbers). The eps model's DDPM-1000 chain is the reference. Writes a table, JSON, a plot and sample grids to
benchmarks/results/edm_digits.*.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from reuse import timed_run  # benchmarks/reuse.py, beside this script

import difflab
from difflab.evaluation import evaluate
from difflab.viz import save_grid

RESULTS = Path(__file__).resolve().parent / "results"
# (sampler, steps, spacing) at about 10, 18 and 35 NFE; Heun costs 2N - 1
GRID = {
    "eps": [("ddim", 10, "uniform"), ("ddim", 18, "uniform"), ("ddim", 35, "uniform"),
            ("dpmpp_2m", 10, "karras"), ("dpmpp_2m", 18, "karras"), ("dpmpp_2m", 35, "karras"),
            ("heun", 5, "karras"), ("heun", 10, "karras"), ("heun", 18, "karras")],
    "edm": [("ddim", 10, "karras"), ("ddim", 18, "karras"), ("ddim", 35, "karras"),
            ("dpmpp_2m", 10, "karras"), ("dpmpp_2m", 18, "karras"), ("dpmpp_2m", 35, "karras"),
            ("heun", 5, "karras"), ("heun", 10, "karras"), ("heun", 18, "karras")],
}


def trained(runs: Path, name: str, **settings) -> tuple[Path, float]:
    """The run (trained now, or reused) and its training wall time in seconds."""
    return timed_run(runs / name, lambda: difflab.train(out=str(runs), name=name, overwrite=True, **settings))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=Path("runs/bench"), help="where the two runs live")
    p.add_argument("-n", type=int, default=2000, help="generated images per row (default 2000)")
    p.add_argument("--steps", type=int, default=2000, help="training steps of both runs (the README default)")
    p.add_argument("--skip-ddpm", action="store_true", help="leave out the 1000-step reference (about 10 minutes)")
    args = p.parse_args()
    runs = {"eps": trained(args.runs, "digits-eps", steps=args.steps),
            "edm": trained(args.runs, "digits-edm", steps=args.steps, parameterization="edm")}
    rows = []

    def measure(model: str, sampler: str, steps: int, spacing: str) -> None:
        result = evaluate("digits", str(runs[model][0]), n=args.n, metrics=("fid", "pr"), sampler=sampler,
                          steps=steps, spacing=spacing, seed=0, progress=False)
        rows.append({"model": model, "sampler": sampler, "steps": steps, "spacing": spacing, "nfe": result["fake"]["nfe"],
                     "fid": result["fid"], "precision": result["precision"], "recall": result["recall"]})
        r = rows[-1]
        print(f"{model:<4} {sampler:<9} {spacing:<8} {r['nfe']:>5} {r['fid']:>8.3f} {r['precision']:>10.3f} "
              f"{r['recall']:>7.3f}", flush=True)

    print(f"training wall time: eps {runs['eps'][1]:.0f} s, edm {runs['edm'][1]:.0f} s ({args.steps} steps each)")
    print(f"{'model':<4} {'sampler':<9} {'spacing':<8} {'NFE':>5} {'FID':>8} {'precision':>10} {'recall':>7}")
    for model, grid in GRID.items():
        for sampler, steps, spacing in grid:
            measure(model, sampler, steps, spacing)
    if not args.skip_ddpm:
        measure("eps", "ddpm", 1000, "uniform")
    RESULTS.mkdir(exist_ok=True)
    for model in GRID:  # what the best few-step setting of each looks like
        images = difflab.sample(runs[model][0], 64, sampler="heun", steps=10, spacing="karras", seed=0, device="cpu")
        save_grid(images * 2 - 1, RESULTS / f"edm_digits_{model}_heun19.png", nrow=8)

    out = {"n": args.n, "training_steps": args.steps, "wall_time_s": {m: r[1] for m, r in runs.items()}, "rows": rows,
           "features": "domain-digits (FID comparable only within this project)", "date": time.strftime("%Y-%m-%d")}
    (RESULTS / "edm_digits.json").write_text(json.dumps(out, indent=2))
    plot(rows, RESULTS / "edm_digits.png")
    return 0


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for (model, sampler), style in {("eps", "ddim"): "C0o--", ("eps", "dpmpp_2m"): "C0s-", ("eps", "heun"): "C0^:",
                                    ("edm", "ddim"): "C3o--", ("edm", "dpmpp_2m"): "C3s-", ("edm", "heun"): "C3^:"}.items():
        pts = [r for r in rows if r["model"] == model and r["sampler"] == sampler]
        for ax, key in zip(axes, ("fid", "precision")):
            ax.plot([r["nfe"] for r in pts], [r[key] for r in pts], style, label=f"{model} {sampler}")
    ref = [r for r in rows if r["sampler"] == "ddpm"]
    for ax, key in zip(axes, ("fid", "precision")):
        if ref:
            ax.axhline(ref[0][key], color="gray", lw=1, ls="--", label="eps DDPM-1000")
        ax.set(xlabel="network evaluations (NFE)", ylabel=key, xscale="log")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle("digits, tiny U-Net, 2000 steps: EDM vs eps-prediction (domain-classifier features)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
