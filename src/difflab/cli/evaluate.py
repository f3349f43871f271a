"""``difflab eval``: FID, KID, IS and precision/recall of generated images (tutorial §7)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from difflab import distributed
from difflab.conditioning import read_prompts
from difflab.errors import DifflabError
from difflab.evaluation import (
    evaluate,
    evaluate_autoencoder,
    evaluate_prompts,
    format_autoencoder_table,
    format_table,
    parse_metrics,
)

EPILOG_EVAL = """examples:
  difflab eval --real digits --fake runs/digits                       # sample 10k images on the fly, domain features
  difflab eval --real fashion-mnist --fake runs/fmnist --sampler dpmpp_2m --steps 20 -n 5000
  difflab eval --real cifar10 --fake ./generated --features inception --metrics fid,kid,is
  difflab eval --real fashion-mnist --fake fashion-mnist:test        # real vs real: the floor of each metric
  difflab eval --real cifar10 --fake runs/c10 --save-reference c10.safetensors   # later: --real c10.safetensors
  torchrun --nproc_per_node 4 -m difflab eval --real cifar10 --fake runs/c10 -n 50000   # sampling shared by 4 GPUs
  difflab eval --prompts prompts.txt --fake runs/shapes --guidance-scale 5   # prompt adherence of a shapes model

--features inception is the standard FID network (the 2015-12-05 weights the papers use); the shipped
domain classifiers (digits, fashion-mnist) work offline but their numbers are comparable only to each other.

--prompts checks a text-to-image model trained on the shapes dataset: each image is scored by a rule-based checker
(colour masks, connected components, shape by geometry, position from centroids with a dead zone, as GenEval) for the
objects, count, colours, colour attribution (the right colour on the right shape) and relative position its prompt
asks for. Write a prompt file with: python -c "from difflab.data.shapes import prompts; print(*prompts('held_out', 64, seed=0), sep=chr(10))"."""

def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="measure generated images: FID, KID, IS, precision/recall",
                       description="Compare generated images with real ones (tutorial §7) on the features of one network.",
                       epilog=EPILOG_EVAL, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", help="a dataset (name or name:split), an image folder, or a saved reference (.safetensors)")
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
    text = p.add_argument_group("prompt adherence (text-to-image models trained on --dataset shapes)")
    text.add_argument("--prompts", metavar="FILE", help="score --fake RUN on these prompts (one per line) instead of "
                      "comparing with --real")
    text.add_argument("--per-prompt", type=int, default=4, metavar="K", help="images per prompt (default: 4)")
    text.add_argument("--guidance-scale", type=float, default=None, metavar="W",
                      help="classifier-free guidance scale (default: 3 when the model was trained with caption dropout)")
    text.add_argument("--negative-prompt", default=None, metavar="TEXT", help="replaces the empty prompt in guidance")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=run_eval)

def run_eval(args: argparse.Namespace) -> int:
    options = {"eta": args.eta} if args.eta is not None else {}
    if args.prompts:
        return run_eval_prompts(args, options)
    if args.real is None:
        raise DifflabError("give --real (a dataset, folder or saved reference) to compare with, or --prompts FILE to "
                           "score a text-to-image model's prompt adherence")
    if args.negative_prompt is not None or args.guidance_scale is not None:
        raise DifflabError("--guidance-scale and --negative-prompt apply with --prompts")
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


def run_eval_prompts(args: argparse.Namespace, options: dict) -> int:
    from difflab.metrics.adherence import format_adherence_table

    if args.real is not None:
        raise DifflabError("--prompts scores the model against its prompts; it takes no --real")
    with distributed.session(args.device) as info:
        result = evaluate_prompts(args.fake, read_prompts(args.prompts), per_prompt=args.per_prompt, seed=args.seed,
                                  device=str(info.device), progress=not args.quiet, guidance_scale=args.guidance_scale,
                                  negative_prompt=args.negative_prompt, sampler=args.sampler, steps=args.steps,
                                  spacing=args.spacing, **options)
    if not result:
        return 0
    print(format_adherence_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


EPILOG_EVAL_VAE = """examples:
  difflab eval-vae runs/fashion-mnist-vae --real fashion-mnist            # 10k test images, domain features
  difflab eval-vae runs/cifar10-vae --real cifar10 --features inception -n 10000
  difflab eval-vae ./sd-vae-ft-mse --real ./my_photos --image-size 256 --split train --no-fid

PSNR (dB, higher is better) and SSIM (Wang et al. 2004; 1 = identical) compare each reconstruction with its
original; rFID is the FID between the set of reconstructions and the set of originals (0 = indistinguishable)."""


def add_vae_parser(sub) -> None:
    p = sub.add_parser("eval-vae", help="measure an autoencoder: PSNR, SSIM, rFID, compression",
                       description="Reconstruct real images with an autoencoder (a train-vae run or a diffusers "
                       "AutoencoderKL folder) and measure the reconstructions.", epilog=EPILOG_EVAL_VAE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("vae", metavar="VAE", help="a train-vae run or checkpoint folder, or a diffusers AutoencoderKL folder")
    p.add_argument("--real", required=True, help="a dataset name (or name:split) or an image folder")
    p.add_argument("--split", default="test", help="split of a named dataset (default: test)")
    p.add_argument("-n", "--num", type=int, default=10_000, help="images to reconstruct (default: 10000)")
    p.add_argument("--image-size", type=int, default=None, help="resize to this size (default: the size the "
                   "autoencoder was trained on, else the images' own)")
    p.add_argument("--features", default=None, help="rFID features: inception, digits, fashion-mnist (default: the "
                   "dataset's shipped classifier when there is one, else inception)")
    p.add_argument("--fid", action=argparse.BooleanOptionalAction, default=True, help="compute rFID (default: on)")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default: 256)")
    p.add_argument("--data-dir", default=None, help="where to look for dataset files")
    p.add_argument("--inception-weights", default=None, metavar="PATH", help="a local copy of the FID Inception weights")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON here")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=run_eval_vae)


def run_eval_vae(args: argparse.Namespace) -> int:
    if args.num < 2 or args.batch_size < 1:
        raise DifflabError("-n must be at least 2 and --batch-size at least 1")
    result = evaluate_autoencoder(args.vae, args.real, n=args.num, split=args.split, features=args.features,
                                  fid=args.fid, batch_size=args.batch_size, image_size=args.image_size,
                                  data_dir=args.data_dir, inception_weights=args.inception_weights, device=args.device,
                                  progress=not args.quiet)
    print(format_autoencoder_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
