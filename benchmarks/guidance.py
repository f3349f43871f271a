"""Guidance on the bundled digits: does the model draw the class it is asked for, and what does it cost?

    python benchmarks/guidance.py [--steps 2000] [--per-class 100] [--out benchmarks/results]
    python benchmarks/guidance.py --dataset fashion-mnist --preset small --steps 20000 --device cuda   # on a GPU

Trains (or reuses, with --runs DIR) three runs: a class-conditional model (label dropout 0.1), an unconditional
model and a noise-aware classifier. Then it samples ``--per-class`` images of every class

  * with classifier-free guidance at several scales w (0 = unconditional, 1 = conditional), and
  * from the unconditional model with classifier guidance at several scales s (DDIM = score correction on the
    ODE, DDPM = the ancestral form, a mean shift),

and labels them with the shipped domain classifier (not the guiding one). Printed and saved: accuracy of the
requested class (overall and per class), FID on domain features against the real images (the diversity side of
the trade), and the noise-aware classifier's held-out accuracy at each noise level. Outputs: guidance_<data>.txt
/ .json / .png (accuracy and FID against the scale) and one grid per setting.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import difflab
from difflab.data import load_dataset, to_model_range
from difflab.metrics import compute_features, evaluate_features
from difflab.metrics.domain import load_domain_extractor
from difflab.tasks.noisy_classifier import format_accuracy_table
from difflab.viz import save_grid


def get_run(path: Path, fn, **kwargs) -> Path:
    """Reuse a finished run of these settings (its final checkpoint exists), resume an unfinished one."""
    steps = kwargs["steps"]
    if (path / "checkpoints" / f"step_{steps:07d}").is_dir():
        return path
    if (path / "config.json").is_file():
        return fn(resume=path, progress=False, steps=steps)
    return fn(out=str(path.parent), name=path.name, progress=False, **kwargs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--classifier-steps", type=int, default=2000)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--ddpm-steps", type=int, default=250, help="ancestral steps for classifier guidance with DDPM")
    p.add_argument("--cfg-scales", default="0,0.5,1,2,3,5")
    p.add_argument("--clf-scales", default="0,1,2,4,8")
    p.add_argument("--device", default="auto")
    p.add_argument("--runs", default="runs/guidance-benchmark")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = dict(dataset=args.dataset, preset=args.preset, device=args.device)
    t0 = time.perf_counter()
    cond_run = get_run(runs / f"{args.dataset}-conditional", difflab.train, conditional=True, steps=args.steps, **common)
    uncond_run = get_run(runs / f"{args.dataset}-unconditional", difflab.train, steps=args.steps, **common)
    clf_run = get_run(runs / f"{args.dataset}-classifier", difflab.train_classifier, steps=args.classifier_steps, **common)
    print(f"runs ready in {(time.perf_counter() - t0) / 60:.1f} min: {cond_run}, {uncond_run}, {clf_run}")

    judge = load_domain_extractor(args.dataset, device="cpu")
    real = load_dataset(args.dataset)
    real_feats, _ = compute_features(judge, to_model_range(real.images), progress=False)
    num_classes = len(real.class_names)
    labels = torch.arange(num_classes).repeat_interleave(args.per_class)

    def measure(images: torch.Tensor) -> dict:
        images = images.cpu() * 2 - 1  # [0, 1] -> [-1, 1]
        predicted = judge.predict(images)
        per_class = [float((predicted[labels == k] == k).float().mean()) for k in range(num_classes)]
        feats, probs = compute_features(judge, images, progress=False)
        fid = evaluate_features(real_feats, feats, fake_probs=probs, metrics=["fid"])["fid"]
        return {"accuracy": float((predicted == labels).float().mean()), "per_class": per_class, "fid": fid}

    rows = []
    cond_model = difflab.load_model(cond_run, device=args.device)
    for w in [float(s) for s in args.cfg_scales.split(",")]:
        started = time.perf_counter()
        images = difflab.sample(cond_model, args.per_class, classes="all", guidance_scale=w, sampler="ddim",
                                steps=args.sample_steps, seed=0)
        rows.append({"method": "classifier-free", "sampler": "ddim", "scale": w, **measure(images),
                     "seconds": time.perf_counter() - started})
        save_grid(images[labels_grid(num_classes, args.per_class)] * 2 - 1, out / f"guidance_{args.dataset}_cfg{w:g}.png", nrow=8)
        print(format_row(rows[-1]), flush=True)
    uncond_model = difflab.load_model(uncond_run, device=args.device)
    classifier = difflab.load_classifier(clf_run, device=uncond_model.device)
    for sampler, steps in (("ddim", args.sample_steps), ("ddpm", args.ddpm_steps)):
        for s in [float(x) for x in args.clf_scales.split(",")]:
            started = time.perf_counter()
            images = difflab.sample(uncond_model, args.per_class, classes="all", classifier=classifier,
                                    classifier_scale=s, sampler=sampler, steps=steps, seed=0)
            rows.append({"method": "classifier", "sampler": f"{sampler}-{steps}", "scale": s, **measure(images),
                         "seconds": time.perf_counter() - started})
            save_grid(images[labels_grid(num_classes, args.per_class)] * 2 - 1,
                      out / f"guidance_{args.dataset}_classifier_{sampler}_s{s:g}.png", nrow=8)
            print(format_row(rows[-1]), flush=True)

    accuracy = json.loads((clf_run / "accuracy.json").read_text())
    table = [f"guidance on {args.dataset} ({args.preset} U-Net, {args.steps} training steps; {args.per_class} images per "
             f"class; judged by the shipped domain classifier; FID on its features vs all {len(real.images)} real images)",
             f"{'method':<16} {'sampler':<10} {'scale':>6} {'accuracy':>9} {'FID':>7}  per-class accuracy"]
    table += [format_row(r) for r in rows]
    table += ["", f"noise-aware classifier ({args.classifier_steps} steps): held-out accuracy by noise level "
                  f"({accuracy['held_out']} images)", format_accuracy_table(accuracy["rows"], 1 / num_classes)]
    text = "\n".join(table)
    print(text)
    (out / f"guidance_{args.dataset}.txt").write_text(text + "\n")
    (out / f"guidance_{args.dataset}.json").write_text(json.dumps({"rows": rows, "classifier_accuracy": accuracy}, indent=2))
    plot(rows, out / f"guidance_{args.dataset}.png", args.dataset)


def labels_grid(num_classes: int, per_class: int) -> torch.Tensor:
    """Indices of the first 8 images of each class (one row per class)."""
    return torch.cat([torch.arange(k * per_class, k * per_class + min(8, per_class)) for k in range(num_classes)])


def format_row(r: dict) -> str:
    per = " ".join(f"{a:.2f}" for a in r["per_class"])
    return f"{r['method']:<16} {r['sampler']:<10} {r['scale']:>6g} {r['accuracy']:>9.3f} {r['fid']:>7.2f}  {per}"


def plot(rows: list[dict], path: Path, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=120)
    for (method, sampler) in dict.fromkeys((r["method"], r["sampler"]) for r in rows):
        sel = [r for r in rows if r["method"] == method and r["sampler"] == sampler]
        label = f"{method} ({sampler})"
        axes[0].plot([r["scale"] for r in sel], [r["accuracy"] for r in sel], "o-", label=label)
        axes[1].plot([r["scale"] for r in sel], [r["fid"] for r in sel], "o-", label=label)
    axes[0].set(xlabel="guidance scale", ylabel="accuracy of the requested class", ylim=(0, 1.02))
    axes[1].set(xlabel="guidance scale", ylabel="FID (domain features, lower is better)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"guidance on {dataset}: fidelity to the class vs distance to the data")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
