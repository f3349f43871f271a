"""Does a text-to-image model follow its prompt? Prompt adherence on the procedural shapes dataset, on this machine.

    python benchmarks/text_to_image.py                       # about 45 minutes on 2 CPU cores
    python benchmarks/text_to_image.py --steps 4000 --batch-size 128 --device cuda   # a longer run on a GPU

Two text-conditioned U-Nets are trained on 32x32 shapes (20,000 images; the held-out (colour, shape) pairs
red triangle, blue circle and green square never appear in training), with the same U-Net, steps and seed:
  - minilm:  the frozen, pretrained all-MiniLM-L6-v2 (token vectors cached once), the default;
  - scratch: a small word-level transformer trained jointly with the U-Net.
Each is scored by the rule-based checker (``difflab eval --prompts``: present, count, colour, colour attribution,
position, overall) on prompts of seen combinations and on prompts that name a held-out pair, at guidance scales
1, 3, 5 and 7.5, with DDIM-50 and DPM-Solver++ 2M-20. Writes a table, JSON and captioned sample grids to
benchmarks/results/text_to_image_shapes.*.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from reuse import timed_run  # benchmarks/reuse.py, beside this script

import difflab
from difflab.data.shapes import prompts
from difflab.evaluation import evaluate_prompts
from difflab.viz import save_grid

RESULTS = Path(__file__).resolve().parent / "results"
CATEGORIES = ("present", "count", "colour", "attribution", "position", "overall")
UNET = {"channel_mult": [1, 2, 2], "attn_resolutions": [8]}  # 32 -> 16 -> 8, spatial transformers at 8x8


def train(runs: Path, encoder: str, args) -> tuple[Path, float]:
    """Train (or reuse) the run of one encoder; returns it and its wall time in seconds."""
    return timed_run(runs / encoder, lambda: difflab.train(
        dataset="shapes", image_size=32, text_encoder=encoder, preset="tiny", model=UNET, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, warmup=100, ema_decay=0.999, sample_every=args.steps // 2,
        num_samples=48, checkpoint_every=args.steps // 4, log_every=50, device=args.device, out=str(runs),
        name=encoder, overwrite=True, progress=True))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=Path("runs/text-bench"), help="where the runs live (reused)")
    p.add_argument("--steps", type=int, default=1000, help="training steps per model (default: 1000)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--encoders", default="minilm,scratch")
    p.add_argument("--prompts", type=int, default=48, help="prompts per split (seen, held-out) (default: 48)")
    p.add_argument("--per-prompt", type=int, default=2, help="images per prompt (default: 2)")
    p.add_argument("--scales", default="1,3,5,7.5")
    p.add_argument("--samplers", default="ddim:50,dpmpp_2m:20")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    args.runs.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(exist_ok=True)
    splits = {"seen": prompts("seen", args.prompts, seed=0), "held-out": prompts("held_out", args.prompts, seed=0)}
    scales = [float(s) for s in args.scales.split(",")]
    samplers = [(s.split(":")[0], int(s.split(":")[1])) for s in args.samplers.split(",")]

    rows, trained = [], {}
    for encoder in args.encoders.split(","):
        run, seconds = train(args.runs, encoder, args)
        trained[encoder] = {"run": str(run), "train_seconds": round(seconds, 1)}
        grid_prompts = splits["seen"][:4] + splits["held-out"][:4]
        images = difflab.sample(run, 6, prompts=grid_prompts, steps=50, guidance_scale=5.0, device=args.device)
        save_grid(images * 2 - 1, RESULTS / f"text_to_image_shapes_{encoder}.png", nrow=6,
                  captions=[q for q in grid_prompts for _ in range(6)])
        for sampler, steps in samplers:
            for scale in scales:
                for split, texts in splits.items():
                    start = time.perf_counter()
                    result = evaluate_prompts(str(run), texts, per_prompt=args.per_prompt, seed=0, device=args.device,
                                              progress=False, guidance_scale=scale, sampler=sampler, steps=steps)
                    row = {"encoder": encoder, "sampler": f"{sampler}-{steps}", "scale": scale, "split": split,
                           **{c: result["accuracy"][c] for c in CATEGORIES}, "images": len(texts) * args.per_prompt,
                           "seconds": round(time.perf_counter() - start, 1)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)

    def cell(v):
        return "—" if v is None else f"{100 * v:.0f}%"

    lines = [f"| encoder | sampler | w | prompts | {' | '.join(CATEGORIES)} |",
             "|" + "---|" * (4 + len(CATEGORIES))]
    for r in rows:
        lines.append(f"| {r['encoder']} | {r['sampler']} | {r['scale']:g} | {r['split']} | "
                     + " | ".join(cell(r[c]) for c in CATEGORIES) + " |")
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores" + (
        f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() and args.device != "cpu" else ", no GPU")
    header = (f"text-to-image on 32x32 shapes, {time.strftime('%Y-%m-%d')}, {machine}; "
              + ", ".join(f"{k}: {v['train_seconds'] / 60:.1f} min training" for k, v in trained.items())
              + f"; {args.steps} steps x batch {args.batch_size}; {args.prompts} prompts per split x {args.per_prompt}")
    table = header + "\n\n" + "\n".join(lines)
    print(table)
    (RESULTS / "text_to_image_shapes.txt").write_text(table + "\n")
    (RESULTS / "text_to_image_shapes.json").write_text(json.dumps(
        {"machine": machine, "settings": {k: str(v) for k, v in vars(args).items()}, "trained": trained,
         "unet": UNET, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
