"""``difflab eval``: FID, KID, IS and precision/recall of generated images (tutorial §7)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from difflab import distributed
from difflab.evaluation import evaluate, format_table, parse_metrics

EPILOG_EVAL = """examples:
  difflab eval --real digits --fake runs/digits                       # sample 10k images on the fly, domain features
  difflab eval --real fashion-mnist --fake runs/fmnist --sampler dpmpp_2m --steps 20 -n 5000
  difflab eval --real cifar10 --fake ./generated --features inception --metrics fid,kid,is
  difflab eval --real fashion-mnist --fake fashion-mnist:test        # real vs real: the floor of each metric
  difflab eval --real cifar10 --fake runs/c10 --save-reference c10.safetensors   # later: --real c10.safetensors
  torchrun --nproc_per_node 4 -m difflab eval --real cifar10 --fake runs/c10 -n 50000   # sampling shared by 4 GPUs

--features inception is the standard FID network (the 2015-12-05 weights the papers use); the shipped
domain classifiers (digits, fashion-mnist) work offline but their numbers are comparable only to each other."""

def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="measure generated images: FID, KID, IS, precision/recall",
                       description="Compare generated images with real ones (tutorial §7) on the features of one network.",
                       epilog=EPILOG_EVAL, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", required=True, help="a dataset (name or name:split), an image folder, or a saved reference (.safetensors)")
    p.add_argument("--fake", required=True, help="a run/checkpoint folder (sampled on the fly), an image folder or a dataset")
    p.add_argument("--metrics", default="fid,kid,pr", help="comma-separated: fid, kid, is, pr (default: fid,kid,pr)")
    p.add_argument("--features", default=None, help="inception, digits, fashion-mnist (default: the dataset's shipped "
                   "classifier when there is one, else inception)")
    p.add_argument("-n", "--num", type=int, default=10_000, help="images per side (default: 10000)")
    p.add_argument("--split", default="train", help="split of a named real dataset (default: train)")
    p.add_argument("--data-dir", default=None, help="where to look for dataset files")
    p.add_argument("--inception-weights", default=None, metavar="PATH", help="a local copy of the FID Inception weights")
    p.add_argument("--save-reference", default=None, metavar="FILE", help="save the real features for later --real FILE")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON here")
    p.add_argument("--sampler", default=None, help="when --fake is a run: the sampler (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="when --fake is a run: sampler steps (default: the model's)")
    p.add_argument("--spacing", default=None, help="when --fake is a run: the sigma grid (default: the model's)")
    p.add_argument("--eta", type=float, default=None, help="when --fake is a run: DDIM eta")
    p.add_argument("--seed", type=int, default=0, help="when --fake is a run: seed of the first image")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=run_eval)

def run_eval(args: argparse.Namespace) -> int:
    options = {"eta": args.eta} if args.eta is not None else {}
    with distributed.session(args.device) as info:  # under torchrun the images are sampled in shares, rank 0 measures
        result = evaluate(args.real, args.fake, metrics=parse_metrics(args.metrics), features=args.features, n=args.num,
                          inception_weights=args.inception_weights, device=str(info.device), data_dir=args.data_dir,
                          split=args.split, save_reference=args.save_reference, progress=not args.quiet,
                          sampler=args.sampler, steps=args.steps, spacing=args.spacing, seed=args.seed, **options)
    if not result:
        return 0
    print(format_table(result))
    text = json.dumps(result, indent=2, default=str)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0
