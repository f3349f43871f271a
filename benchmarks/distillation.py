"""Distillation on the bundled digits: the teacher with DDIM and DPM-Solver++(2M) at 1, 2, 4, 8 network evaluations
(NFE) against progressive-distillation students at 1, 2, 4, 8 steps and a consistency model at 1 and 2 steps.

    python benchmarks/distillation.py                       # CPU: about an hour (two distillations + the evaluations)
    python benchmarks/distillation.py --runs runs/bench     # reuses the teacher (digits-eps) and the students there
    python benchmarks/distillation.py --dataset fashion-mnist --device cuda   # a GPU: Fashion-MNIST as well

The teacher is the README's main job (`difflab train`: tiny U-Net, eps-prediction, 2000 steps). Every row is judged
by the shipped domain classifier (FID and precision/recall against the real images, `difflab eval`'s numbers); the
teacher's 1000-step DDPM chain is the reference. The compute of each distillation (wall time, images seen) is in
the table. Writes a table, JSON, a plot and sample grids to benchmarks/results/distillation_<dataset>.*.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from reuse import timed_run  # benchmarks/reuse.py, beside this script

import difflab
from difflab.evaluation import evaluate
from difflab.viz import save_grid

RESULTS = Path(__file__).resolve().parent / "results"
NFES = (1, 2, 4, 8)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=Path("runs/bench"), help="where the teacher and the students live")
    p.add_argument("--dataset", default="digits")
    p.add_argument("-n", type=int, default=2000, help="generated images per row (default 2000)")
    p.add_argument("--teacher-steps", type=int, default=2000, help="training steps of the teacher")
    p.add_argument("--updates", type=int, default=1000, help="progressive: updates per halving")
    p.add_argument("--cd-updates", type=int, default=3000, help="consistency: updates")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-ddpm", action="store_true", help="leave out the 1000-step reference")
    args = p.parse_args()
    runs, name = args.runs, args.dataset
    common = dict(out=str(runs), overwrite=True, progress=False, device=args.device)
    teacher, teacher_s = timed_run(runs / f"{name}-eps", lambda: difflab.train(
        dataset=name, name=f"{name}-eps", steps=args.teacher_steps, **common))
    progressive, progressive_s = timed_run(runs / f"{name}-progressive", lambda: difflab.distill(
        teacher, method="progressive", from_steps=64, to_steps=1, updates=args.updates, batch_size=args.batch_size,
        name=f"{name}-progressive", **common))
    consistency, consistency_s = timed_run(runs / f"{name}-consistency", lambda: difflab.distill(
        teacher, method="consistency", updates=args.cd_updates, batch_size=args.batch_size,
        name=f"{name}-consistency", **common))
    compute = {"teacher": (teacher_s, args.teacher_steps * 128)}
    for label, run, seconds in (("progressive", progressive, progressive_s),
                                ("consistency", consistency, consistency_s)):
        steps = json.loads((run / "config.json").read_text())["run"]["steps"]
        compute[label] = (seconds, steps * args.batch_size)
    rows = []

    def measure(model: str, source: Path, sampler: str | None = None, steps: int | None = None, **options) -> None:
        result = evaluate(name, str(source), n=args.n, metrics=("fid", "pr"), sampler=sampler, steps=steps, seed=0,
                          progress=False, device=args.device, **options)
        rows.append({"model": model, "sampler": sampler or "(its own)", "steps": steps, "nfe": result["fake"]["nfe"],
                     "fid": result["fid"], "precision": result["precision"], "recall": result["recall"],
                     **{k: v for k, v in options.items() if v is not None}})
        r = rows[-1]
        print(f"{model:<22} {r['sampler']:<12} {r['nfe']:>5} {r['fid']:>8.3f} {r['precision']:>10.3f} "
              f"{r['recall']:>7.3f}", flush=True)

    print(f"{args.dataset}; compute: " + ", ".join(f"{k} {s / 60:.1f} min, {n:,} images seen"
                                                   for k, (s, n) in compute.items()))
    print(f"{'model':<22} {'sampler':<12} {'NFE':>5} {'FID':>8} {'precision':>10} {'recall':>7}")
    for nfe in NFES:
        measure("teacher", teacher, "ddim", nfe, spacing="trailing")
    for nfe in NFES:
        measure("teacher", teacher, "dpmpp_2m", nfe, spacing="karras")
    for nfe in NFES:  # each progressive stage is a model of its own, sampled with its own DDIM grid
        measure(f"progressive {nfe}-step", progressive / f"stage_{nfe}_steps")
    for nfe in (1, 2):
        measure("consistency", consistency, "consistency", nfe)
    if not args.skip_ddpm:
        measure("teacher", teacher, "ddpm", 1000)
    RESULTS.mkdir(exist_ok=True)
    shown = [("progressive", progressive / "stage_1_steps", {}), ("progressive", progressive / "stage_4_steps", {}),
             ("consistency", consistency, {}), ("teacher_ddim", teacher, {"sampler": "ddim", "steps": 4,
                                                                           "spacing": "trailing"})]
    for label, source, options in shown:
        images = difflab.sample(source, 64, seed=0, device="cpu", **options)
        tag = f"{label}_{source.name}" if label == "progressive" else label
        save_grid(images * 2 - 1, RESULTS / f"distillation_{name}_{tag}.png", nrow=8)
    out = {"dataset": name, "n": args.n, "rows": rows, "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                      f"{'cuda' if torch.cuda.is_available() and args.device != 'cpu' else 'cpu'}",
           "compute": {k: {"seconds": s, "images_seen": n} for k, (s, n) in compute.items()},
           "settings": {"progressive": {"from_steps": 64, "to_steps": 1, "updates_per_stage": args.updates},
                        "consistency": {"updates": args.cd_updates}, "batch_size": args.batch_size},
           "features": "domain classifier (FID comparable only within this project)"}
    (RESULTS / f"distillation_{name}.json").write_text(json.dumps(out, indent=2))
    plot(rows, RESULTS / f"distillation_{name}.png", name)
    return 0


def plot(rows: list[dict], path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    series = {"teacher DDIM": lambda r: r["model"] == "teacher" and r["sampler"] == "ddim",
              "teacher DPM-Solver++(2M)": lambda r: r["model"] == "teacher" and r["sampler"] == "dpmpp_2m",
              "progressive students": lambda r: r["model"].startswith("progressive"),
              "consistency model": lambda r: r["model"] == "consistency"}
    for (label, pick), style in zip(series.items(), ("C0o--", "C1s--", "C2^-", "C3D-")):
        pts = sorted((r for r in rows if pick(r)), key=lambda r: r["nfe"])
        for ax, key in zip(axes, ("fid", "precision")):
            ax.plot([r["nfe"] for r in pts], [r[key] for r in pts], style, label=label)
    ref = [r for r in rows if r["sampler"] == "ddpm"]
    for ax, key in zip(axes, ("fid", "precision")):
        if ref:
            ax.axhline(ref[0][key], color="gray", lw=1, ls="--", label="teacher DDPM-1000")
        ax.set(xlabel="network evaluations (NFE)", ylabel=key, xscale="log", xticks=list(NFES),
               xticklabels=[str(n) for n in NFES])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{name}: distilled students vs the teacher's samplers (domain-classifier features)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
