"""The ``difflab`` command line: thin, it only parses arguments and calls the library."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
import typing
from pathlib import Path

from difflab.errors import DifflabError

EPILOG_TRAIN = """examples:
  difflab train                                  # tiny U-Net on the bundled 8x8 digits (CPU, a few minutes)
  difflab train --dataset fashion-mnist --preset small --steps 20000 --batch-size 128
  difflab train --dataset ./my_photos --image-size 64 --preset small
  difflab train --config run.yaml --lr 1e-4      # flags override the file
  difflab train --resume runs/digits --steps 10000
  difflab train --conditional                    # class-conditional (label dropout 0.1): one row per class in samples.png
  torchrun --nproc_per_node 4 -m difflab train --dataset cifar10 --preset ddpm-cifar10   # 4 GPUs, global batch split

every run folder holds config.json, log.jsonl, loss.png, samples.png (+ samples/step_*.png) and
checkpoints/step_*/ (safetensors weights + EMA + JSON config + optimizer state). The first Ctrl-C saves a
checkpoint and stops; a NaN step is skipped; --max-bad-steps of them in a row stop the run with a checkpoint."""

EPILOG_SAMPLE = """examples:
  difflab sample runs/digits                               # DDIM, 50 steps, 64 images -> runs/digits/generated/
  difflab sample runs/digits --sampler ddpm -n 16 --seed 3   # the full 1000-step ancestral chain
  difflab sample runs/digits --sampler ddim --steps 20 --eta 0.5 --individual --out pics/
  difflab sample runs/digits --sampler dpmpp_2m --steps 15 --spacing karras
  difflab sample runs/digits --sampler heun --steps 10 --threshold 0.995
  difflab samplers                                         # every sampler, its cost and what it is

class-conditional models (difflab train --conditional) and guidance:
  difflab sample runs/digits-cond                          # one row per class, guidance scale 3
  difflab sample runs/digits-cond --class 3 --guidance-scale 3.0 -n 16
  difflab sample runs/fashion-mnist --class sandal,bag --guidance-scale 5 --guidance-rescale 0.7
  difflab sample runs/digits --classifier runs/digits-classifier --class all --classifier-scale 2
guidance scale w: 0 = unconditional, 1 = conditional, >1 trades diversity for fidelity.

DDIM with eta = 0 is deterministic (Euler on the probability-flow ODE); eta = 1 is DDPM's ancestral step.
The same --seed gives the same images whatever the batch size; image i uses seed + i."""


def _flag_type(hint):
    """The argparse type for a TrainConfig field's type hint."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    base = args[0]
    if base is bool:
        return lambda s: _parse_bool(s)
    return base


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{s}'")


def _help(text: str, default) -> str:
    return text if default is None else f"{text} (default: {default})"


def add_train_parser(sub) -> None:
    from difflab.config import TrainConfig

    p = sub.add_parser("train", help="train a diffusion model", description="Train a DDPM-style diffusion model "
                       "(tutorial §4.1) and write samples, a loss plot and checkpoints to a run folder.",
                       epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, TrainConfig)


EPILOG_CLASSIFIER = """examples:
  difflab train-classifier                                  # on the bundled digits (CPU, about a minute)
  difflab train-classifier --dataset fashion-mnist --preset small --steps 20000
  difflab sample runs/digits --classifier runs/digits-classifier --class 7 --classifier-scale 2

Train it on the same data, image size, schedule and timesteps as the diffusion model it will guide.
The run folder holds accuracy.json / accuracy.png: held-out accuracy at each noise level."""


def add_train_classifier_parser(sub) -> None:
    from difflab.config import ClassifierTrainConfig

    p = sub.add_parser("train-classifier", help="train a noise-aware classifier for classifier guidance",
                       description="Train p(y | x_t, t), the U-Net's encoder half with a pooling head, on noisy images "
                       "at every noise level (Dhariwal & Nichol 2021; tutorial §8.2), for classifier guidance.",
                       epilog=EPILOG_CLASSIFIER, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, ClassifierTrainConfig)


def add_config_flags(p: argparse.ArgumentParser, config_class) -> None:
    """--config, --resume, --overwrite, --quiet and one flag per field of the config dataclass."""
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of options (flags override it)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same --name")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        if f.name == "model":
            continue  # a nested dict: config files only
        default = f.default if f.default is not dataclasses.MISSING else None
        is_bool = bool in (typing.get_args(hints[f.name]) or (hints[f.name],))
        extra = {"nargs": "?", "const": True, "metavar": "BOOL"} if is_bool else {"metavar": f.name.split("_")[-1].upper()}
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=_flag_type(hints[f.name]),
                       default=argparse.SUPPRESS, help=_help(f.metadata["help"], default), **extra)


def add_sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="generate images from a trained model",
                       description="Generate images from a run folder or checkpoint (EMA weights by default) "
                       "with any sampler; prints the network evaluations (NFE) and the time per image.",
                       epilog=EPILOG_SAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="RUN_OR_CHECKPOINT", help="a run folder (its newest checkpoint) or a checkpoint folder")
    p.add_argument("--sampler", default="ddim", help="a sampler from `difflab samplers` (default: ddim)")
    p.add_argument("--steps", type=int, default=None, help="grid steps (default: T for ddpm, 50 otherwise; NFE can differ)")
    p.add_argument("--spacing", default="uniform", choices=["uniform", "trailing", "leading", "karras"],
                   help="the sigma grid: a subsequence of the model's timesteps, or Karras et al.'s rho=7 spacing "
                        "(default: uniform)")
    p.add_argument("--rho", type=float, default=7.0, help="karras spacing: rho (default: 7)")
    options = p.add_argument_group("sampler options (each applies to the samplers that take it)")
    options.add_argument("--eta", type=float, help="noise re-injection in [0, 1]: ddim, euler_ancestral, dpmpp_2m_sde")
    options.add_argument("--variance", choices=["posterior", "beta"], help="ddpm step variance: beta~_t or beta_t")
    options.add_argument("--churn", type=float, help="edm: S_churn, how much noise is added back per step")
    options.add_argument("--tol", type=float, dest="rtol", help="adaptive: relative error tolerance instead of --steps")
    options.add_argument("--max-nfe", type=int, help="adaptive: never use more network evaluations than this")
    options.add_argument("--predictor", help="pc: the predictor sampler (default: euler)")
    options.add_argument("--corrector-steps", type=int, help="pc: Langevin corrector steps after each predictor step")
    options.add_argument("--snr", type=float, help="pc: signal-to-noise ratio that sets the Langevin step size")
    guidance = p.add_argument_group("classes and guidance")
    guidance.add_argument("--class", dest="classes", metavar="CLASS",
                          help="class index or name, a comma list, or 'all' (default for a class-conditional model: all, "
                               "one row per class)")
    guidance.add_argument("--guidance-scale", type=float, default=None, metavar="W",
                          help="classifier-free guidance scale: 0 = unconditional, 1 = conditional, >1 = stronger "
                               "(default for a class-conditional model: 3)")
    guidance.add_argument("--guidance-rescale", type=float, default=0.0, metavar="PHI",
                          help="guidance rescale in [0, 1] (Lin et al. 2024) against over-saturation at large scales")
    guidance.add_argument("--classifier", metavar="RUN",
                          help="classifier guidance with this noise-aware classifier (difflab train-classifier)")
    guidance.add_argument("--classifier-scale", type=float, default=1.0, metavar="S",
                          help="classifier guidance scale (default: 1, the plain conditional score)")
    p.add_argument("-n", "--num", type=int, default=None,
                   help="how many images (default: 64), or images per class when classes are sampled (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default: 0)")
    p.add_argument("--batch-size", type=int, default=256, help="images per network call (default: 256)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/generated)")
    p.add_argument("--grid", action=argparse.BooleanOptionalAction, default=True, help="write one grid PNG (default: on)")
    p.add_argument("--individual", action="store_true", help="also write one PNG per image")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="EMA (default) or raw weights")
    p.add_argument("--no-clip", action="store_true", help="do not clamp the x0 estimate to [-1, 1]")
    p.add_argument("--threshold", type=float, default=None, metavar="PERCENTILE",
                   help="dynamic thresholding of the x0 estimate at this percentile, e.g. 0.995 (Imagen)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


SAMPLER_OPTIONS = ("eta", "variance", "churn", "rtol", "max_nfe", "predictor", "corrector_steps", "snr")


EPILOG_EVAL = """examples:
  difflab eval --real digits --fake runs/digits                       # sample 10k images on the fly, domain features
  difflab eval --real fashion-mnist --fake runs/fmnist --sampler dpmpp_2m --steps 20 -n 5000
  difflab eval --real cifar10 --fake ./generated --features inception --metrics fid,kid,is
  difflab eval --real fashion-mnist --fake fashion-mnist:test        # real vs real: the floor of each metric
  difflab eval --real cifar10 --fake runs/c10 --save-reference c10.safetensors   # later: --real c10.safetensors
  torchrun --nproc_per_node 4 -m difflab eval --real cifar10 --fake runs/c10 -n 50000   # sampling shared by 4 GPUs

--features inception is the standard FID network (the 2015-12-05 weights the papers use); the shipped
domain classifiers (digits, fashion-mnist) work offline but their numbers are comparable only to each other."""


def add_eval_parser(sub) -> None:
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
    p.add_argument("--sampler", default="ddim", help="when --fake is a run: the sampler (default: ddim)")
    p.add_argument("--steps", type=int, default=None, help="when --fake is a run: sampler steps")
    p.add_argument("--spacing", default="uniform", help="when --fake is a run: the sigma grid")
    p.add_argument("--eta", type=float, default=None, help="when --fake is a run: DDIM eta")
    p.add_argument("--seed", type=int, default=0, help="when --fake is a run: seed of the first image")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run_eval(args: argparse.Namespace) -> int:
    import json

    from difflab import distributed
    from difflab.evaluation import evaluate, format_table, parse_metrics

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


def add_samplers_parser(sub) -> None:
    sub.add_parser("samplers", help="list the samplers", description="List every sampler with a one-line description.")


def run_samplers(args: argparse.Namespace) -> int:
    from difflab.samplers import SAMPLERS

    print(f"{'sampler':<16} {'NFE for N steps':<16} {'kind':<14} description")
    for name, info in SAMPLERS.items():
        kind = "stochastic" if info.stochastic else f"ODE, order {info.order}"
        nfe = ("set by --tol" if info.nfe is None else "N" if info.nfe(10) == 10 else "2N - 1" if info.nfe(10) == 19
               else f"{info.nfe(10)} for N=10")
        print(f"{name:<16} {nfe:<16} {kind:<14} {info.description}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from difflab.train import train

    started = time.perf_counter()
    run = _run_config_command(args, train, None)
    minutes = (time.perf_counter() - started) / 60
    print(f"done in {minutes:.1f} min: {run}  (samples: {run / 'samples.png'}, loss plot: {run / 'loss.png'})")
    print(f"sample more with: difflab sample {run}")
    return 0


def _run_config_command(args: argparse.Namespace, fn, config_class):
    """Call ``train`` or ``train_classifier`` with the config file, the flags and --resume / --overwrite."""
    from difflab.config import load_config_file

    special = {"config", "resume", "overwrite", "quiet", "command"}
    flags = {k: v for k, v in vars(args).items() if k not in special}
    data = load_config_file(args.config, config_class) if args.config else {}
    if args.resume:
        return fn(resume=args.resume, progress=not args.quiet, **{**data, **flags})
    return fn({**data, **flags}, overwrite=args.overwrite, progress=not args.quiet)


def run_train_classifier(args: argparse.Namespace) -> int:
    from difflab.classifier import train_classifier
    from difflab.config import ClassifierTrainConfig

    run = _run_config_command(args, train_classifier, ClassifierTrainConfig)
    print(f"done: {run}  (accuracy by noise level: {run / 'accuracy.png'})")
    print(f"guide a model with: difflab sample RUN --classifier {run} --class all")
    return 0


def run_sample(args: argparse.Namespace) -> int:
    from difflab import distributed

    with distributed.session(args.device) as info:  # under torchrun: every process samples a share, rank 0 writes
        return _sample(args, info)


def _sample(args: argparse.Namespace, info) -> int:
    import torch

    from difflab import distributed
    from difflab.pipeline import generate, load_model
    from difflab.viz import save_grid, to_pil

    options = {k: getattr(args, k) for k in SAMPLER_OPTIONS if getattr(args, k) is not None}
    model = load_model(args.model, weights=args.weights, device=info.device)
    guidance, cond = _guidance_options(args, model)
    num = args.num if args.num is not None else (8 if cond is not None else 64)
    if num < 1:
        raise DifflabError(f"-n must be at least 1, got {num}")
    per_row = None
    if cond is not None:
        cond, per_row = cond.repeat_interleave(num), num  # one row per class
    stats: dict = {}
    sample_fn = distributed.generate_sharded if info.distributed else generate
    with torch.autocast("cuda", torch.bfloat16) if model.device.type == "cuda" else torch.autocast("cpu", enabled=False):
        images = sample_fn(model.denoiser, model.image_shape, len(cond) if cond is not None else num, sampler=args.sampler,
                           steps=args.steps, spacing=args.spacing, rho=args.rho, seed=args.seed, batch_size=args.batch_size,
                           clip=not args.no_clip, threshold=args.threshold, progress=not args.quiet and info.is_main,
                           stats=stats, cond=cond, **guidance, **options)
    num = len(images)
    if not info.is_main:
        return 0
    run_dir = model.checkpoint.parent.parent if model.checkpoint.parent.name == "checkpoints" else model.checkpoint
    out = Path(args.out) if args.out else run_dir / "generated"
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{args.sampler}_{args.steps or 'default'}steps_seed{args.seed}"
    extras = {"spacing": args.spacing if args.spacing != "uniform" else None, "threshold": args.threshold,
              "weights": args.weights if args.weights != "ema" else None, "noclip": True if args.no_clip else None,
              "class": args.classes.replace(",", "+").replace("/", "-").replace(" ", "") if args.classes else None,
              "cfg": guidance.get("guidance_scale"), "rescale": guidance.get("guidance_rescale") or None,
              "clf": guidance.get("classifier_scale"), **options}
    tag += "".join(f"_{k}{'' if v is True else v}" for k, v in extras.items() if v is not None)
    written = []
    if args.grid:
        written.append(save_grid(images, out / f"{tag}.png", nrow=per_row))
    if args.individual:
        for i, img in enumerate(to_pil(images)):
            img.save(out / f"{tag}_{i:05d}.png")
        written.append(out / f"{tag}_*.png")
    seconds = stats["seconds"]
    print(f"{num} images, {stats['nfe']} network evaluations (NFE) each, {seconds:.1f} s "
          f"({seconds / num * 1000:.1f} ms/image) -> " + ", ".join(str(w) for w in written))
    return 0


def _guidance_options(args: argparse.Namespace, model):
    """(generate() guidance keywords, the classes to sample or None) from the sample flags."""
    import torch

    from difflab.pipeline import parse_classes

    classes = "all" if args.classes is None else args.classes
    if args.classifier:
        from difflab.classifier import load_classifier

        if args.guidance_scale is not None or args.guidance_rescale:
            raise DifflabError("use either classifier-free guidance (--guidance-scale, --guidance-rescale) or a "
                               "--classifier, not both")
        classifier = load_classifier(args.classifier, device=model.device)
        if model.num_classes is not None:
            raise DifflabError("--classifier guides an unconditional model; this one is class-conditional "
                               "(use --guidance-scale)")
        labels = parse_classes(classes, classifier.class_names, len(classifier.class_names))
        return {"classifier": classifier, "classifier_scale": args.classifier_scale}, torch.tensor(labels)
    if args.classifier_scale != 1.0:
        raise DifflabError("--classifier-scale applies only with --classifier")
    if model.num_classes is None:
        if args.classes is not None or args.guidance_scale is not None:
            raise DifflabError("this model is unconditional: --class and --guidance-scale need a model trained with "
                               "--conditional (or classifier guidance: --classifier RUN)")
        if args.guidance_rescale:
            raise DifflabError("--guidance-rescale applies only with classifier-free guidance")
        return {}, None
    labels = parse_classes(classes, model.class_names, model.num_classes)
    trained_unconditional = model.config.get("label_dropout", 0.1) > 0
    scale = args.guidance_scale if args.guidance_scale is not None else (3.0 if trained_unconditional else 1.0)
    if scale != 1.0 and not trained_unconditional:
        print("warning: this model was trained without label dropout, so its null class is untrained; guidance "
              "scales other than 1 extrapolate from noise", file=sys.stderr)
    return {"guidance_scale": scale, "guidance_rescale": args.guidance_rescale}, torch.tensor(labels)


def build_parser() -> argparse.ArgumentParser:
    from difflab import __version__

    parser = argparse.ArgumentParser(prog="difflab", description="Denoising diffusion models: train, sample.",
                                     epilog="run 'difflab COMMAND --help' for the options of each command")
    parser.add_argument("--version", action="version", version=f"difflab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_train_parser(sub)
    add_train_classifier_parser(sub)
    add_sample_parser(sub)
    add_samplers_parser(sub)
    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    commands = {"train": run_train, "train-classifier": run_train_classifier, "sample": run_sample,
                "samplers": run_samplers, "eval": run_eval}
    rank = os.environ.get("RANK", "0")  # under torchrun only rank 0 talks; the others report their own errors
    try:
        if rank != "0":
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                return commands[args.command](args)
        return commands[args.command](args)
    except DifflabError as e:
        if rank == "0" or not e.all_ranks:
            print(f"difflab: error{'' if rank == '0' else f' (rank {rank})'}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("difflab: interrupted", file=sys.stderr)
        return 130
