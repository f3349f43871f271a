"""One diffusers model, two libraries: diffusers' own pipeline and schedulers against difflab's samplers on the same
weights, judged by the same metric.

    python benchmarks/diffusers_interop.py                      # CPU: about 30 minutes (most of it the DDPM rows)
    python benchmarks/diffusers_interop.py --runs runs/bench    # reuses the teacher run there (digits-eps)

The model is the README's main job (`difflab train`: tiny U-Net, eps, 2000 steps on the bundled digits), exported
with `difflab export --format diffusers` -- so it is a plain DDPMPipeline folder. diffusers samples it with
DDPMPipeline and its DDIM and DPM-Solver++ schedulers; difflab loads the same folder (`difflab.load`, the diffusers
U-Net running inside difflab) and samples it with its own samplers. Every row: n images, FID / precision / recall
against the real digits on the shipped domain classifier's features (`difflab eval`'s numbers), and wall time per
image. Writes a table and JSON to benchmarks/results/diffusers_interop_digits.*.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import diffusers
import torch
from reuse import timed_run  # benchmarks/reuse.py, beside this script

import difflab
from difflab.evaluation import load_real_images
from difflab.metrics import compute_features, evaluate_features, get_extractor

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=Path("runs/bench"), help="where the teacher run lives")
    p.add_argument("-n", type=int, default=1000, help="generated images per row (default 1000)")
    p.add_argument("--batch-size", type=int, default=500)
    args = p.parse_args()
    torch.manual_seed(0)
    teacher, _ = timed_run(args.runs / "digits-eps", lambda: difflab.train(
        dataset="digits", name="digits-eps", steps=2000, out=str(args.runs), overwrite=True, progress=False))
    folder = args.runs / "digits-eps-diffusers"
    shutil.rmtree(folder, ignore_errors=True)
    difflab.export(teacher, folder, format="diffusers")

    extractor = get_extractor("digits", device="cpu")
    real, _ = load_real_images("digits", n=args.n, image_size=8, channels=1, progress=False)
    real_feats, _ = compute_features(extractor, real, progress=False)
    rows = []

    def score(library: str, sampler: str, nfe: int, images: torch.Tensor, seconds: float) -> None:
        feats, probs = compute_features(extractor, images, progress=False)
        m = evaluate_features(real_feats, feats, fake_probs=probs, metrics=("fid", "pr"))
        rows.append({"library": library, "sampler": sampler, "nfe": nfe, "fid": m["fid"], "precision": m["precision"],
                     "recall": m["recall"], "ms_per_image": 1000 * seconds / len(images)})
        r = rows[-1]
        print(f"{library:<10} {sampler:<34} {nfe:>5} {r['fid']:>8.2f} {r['precision']:>10.3f} {r['recall']:>7.3f} "
              f"{r['ms_per_image']:>9.2f}", flush=True)

    print(f"{'library':<10} {'sampler':<34} {'NFE':>5} {'FID':>8} {'precision':>10} {'recall':>7} {'ms/image':>9}")
    pipe = diffusers.DDPMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    ddpm_config = dict(pipe.scheduler.config)
    their = [("DDPMPipeline (ancestral)", diffusers.DDPMScheduler, 1000, {}),
             ("DDIMScheduler", diffusers.DDIMScheduler, 50, {}),
             ("DDIMScheduler", diffusers.DDIMScheduler, 10, {}),
             ("DPMSolverMultistep (++ 2M)", diffusers.DPMSolverMultistepScheduler, 20, {}),
             ("DPMSolverMultistep (++ 2M)", diffusers.DPMSolverMultistepScheduler, 10, {}),
             ("DPMSolverMultistep (++ 3M)", diffusers.DPMSolverMultistepScheduler, 10, {"solver_order": 3})]
    for label, cls, steps, extra in their:
        pipe.scheduler = cls.from_config(ddpm_config, **extra)
        start, parts = time.perf_counter(), []
        for i in range(0, args.n, args.batch_size):
            out = pipe(batch_size=min(args.batch_size, args.n - i), num_inference_steps=steps, output_type="np",
                       generator=torch.Generator().manual_seed(i))
            parts.append(torch.from_numpy(out.images).permute(0, 3, 1, 2) * 2 - 1)
        score("diffusers", label, steps, torch.cat(parts), time.perf_counter() - start)

    model = difflab.load(folder, device="cpu")  # the same diffusers folder, through difflab
    ours = [("ddpm", 1000, None), ("ddim", 50, None), ("ddim", 10, None), ("dpmpp_2m", 20, "karras"),
            ("dpmpp_2m", 10, "karras"), ("dpmpp_3m", 10, None), ("dpmpp_3m", 10, "karras"), ("heun", 5, None),
            ("adaptive", None, None)]
    for sampler, steps, spacing in ours:
        stats = {}
        options = {"rtol": 0.05} if sampler == "adaptive" else {}
        images = difflab.generate(model, args.n, sampler=sampler, steps=steps, spacing=spacing, seed=0,
                                  batch_size=args.batch_size, stats=stats, **options)
        label = sampler + (f" ({spacing})" if spacing else "") + (" (tol 0.05)" if options else "")
        score("difflab", label, stats["nfe"], images, stats["seconds"])

    RESULTS.mkdir(exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}, diffusers {diffusers.__version__}",
            "n": args.n, "model": str(teacher), "features": "domain-digits"}
    (RESULTS / "diffusers_interop_digits.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["| library | sampler | NFE | FID | precision | recall | ms/image |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['library']} | {r['sampler']} | {r['nfe']} | {r['fid']:.2f} | {r['precision']:.3f} | "
              f"{r['recall']:.3f} | {r['ms_per_image']:.2f} |" for r in rows]
    (RESULTS / "diffusers_interop_digits.md").write_text("\n".join([json.dumps(meta), "", *lines, ""]))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
