"""``difflab export``: a trained model as a diffusers pipeline folder or one self-describing safetensors file."""

from __future__ import annotations

import argparse

from difflab.export import FORMATS

EPILOG = """examples:
  difflab export runs/digits --format diffusers exported/digits      # a DDPMPipeline folder
  difflab export runs/digits-cond --format diffusers exported/cond   # class-conditional: UNet2DModel class embedding
  difflab export runs/fashion-mnist --format safetensors fmnist.safetensors   # one file: weights + config

then, in Python:
  from diffusers import DDPMPipeline
  pipe = DDPMPipeline.from_pretrained("exported/digits")              # diffusers' own sampler
  model = difflab.load("exported/digits")                             # or back into difflab, every sampler

--format diffusers writes UNet2DModel weights, a DDPMScheduler config with the model's betas and prediction type,
and difflab.json (the difflab config: class names, data). Only DDPM-style (VP) pixel models map onto diffusers'
UNet2DModel; for EDM, consistency, latent and text models, and for U-Nets whose GroupNorm groups or head sizes have
no UNet2DModel equivalent, the export is refused with the reason (use --format safetensors for those). Before
writing, the diffusers U-Net is run against difflab's: a folder is written only if they compute the same function.
--format safetensors writes the weights and the model config in one file that difflab.load() and every difflab
command read."""


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a model to diffusers or one safetensors file",
                       description="Export a run or checkpoint (EMA weights by default) as a diffusers pipeline folder "
                                   "or as one self-describing .safetensors file.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="RUN_OR_CHECKPOINT", help="a run folder (its newest checkpoint) or a checkpoint folder")
    p.add_argument("out", metavar="OUT", help="the folder to create (diffusers) or the file (safetensors: NAME.safetensors)")
    p.add_argument("--format", default="diffusers", choices=FORMATS,
                   help="diffusers: a DDPMPipeline folder; safetensors: one file (default: diffusers)")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="EMA (default) or raw weights")
    p.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    from difflab.export import export

    out = export(args.model, args.out, format=args.format, weights=args.weights)
    hint = (f"load it with DDPMPipeline.from_pretrained('{out}') or difflab.load('{out}')" if args.format == "diffusers"
            else f"load it with difflab.load('{out}') or any difflab command")
    print(f"wrote {out} ({hint})")
    return 0
