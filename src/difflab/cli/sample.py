"""``difflab sample`` (generate images from a trained model) and ``difflab samplers`` (list the samplers)."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import torch

from difflab import distributed
from difflab.conditioning import cond_len, cond_repeat_interleave, parse_classes, read_prompts
from difflab.devices import autocast
from difflab.errors import DifflabError
from difflab.generate import check_sigmas, default_guidance_scale, generate_sharded
from difflab.models import Model, load_classifier, load_model
from difflab.samplers import SAMPLERS
from difflab.viz import save_grid, to_pil

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
text-to-image models (difflab train --text-encoder ...):
  difflab sample runs/shapes                               # the training grid's prompts, one row each, guidance 3
  difflab sample runs/shapes --prompt "a red circle to the left of a blue square" --guidance-scale 5 -n 8
  difflab sample runs/shapes --prompts prompts.txt --negative-prompt "a green square" --sampler dpmpp_2m --steps 20
guidance scale w: 0 = unconditional, 1 = conditional, >1 trades diversity for fidelity.
distilled models (difflab distill ...) sample with their own settings unless told otherwise:
  difflab sample runs/digits-progressive                   # DDIM at the step count it was distilled to
  difflab sample runs/digits-progressive/stage_8_steps     # an earlier stage of the same run
  difflab sample runs/digits-consistency                   # the consistency sampler, 1 step
  difflab sample runs/digits-consistency --sigmas 157,1    # 2 steps: denoise, re-noise to 1, denoise
diffusers models (pip install 'difflab[diffusers]'): a pipeline folder or, online, a hub id:
  difflab sample google/ddpm-cifar10-32 --sampler dpmpp_3m --steps 20   # -> ./generated/google-ddpm-cifar10-32/
  difflab sample ./sd-v1-5 --prompt "a watercolor fox" --sampler dpmpp_2m --steps 25 -n 4   # Stable Diffusion 1.x/2.x
  difflab sample exported.safetensors                      # a single-file model (difflab export --format safetensors)

DDIM with eta = 0 is deterministic (Euler on the probability-flow ODE); eta = 1 is DDPM's ancestral step.
The same --seed gives the same images whatever the batch size; image i uses seed + i."""


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="generate images from a trained model",
                       description="Generate images from a run folder or checkpoint (EMA weights by default) "
                       "with any sampler; prints the network evaluations (NFE) and the time per image.",
                       epilog=EPILOG_SAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="RUN_OR_CHECKPOINT", help="a run folder (its newest checkpoint), a checkpoint folder, "
                   "a .safetensors file (difflab export), or a diffusers pipeline folder or hub id (DDPMPipeline, "
                   "Stable Diffusion; pip install 'difflab[diffusers]')")
    p.add_argument("--sampler", default=None, help="a sampler from `difflab samplers` (default: the model's: ddim for "
                   "DDPM-style models, heun for EDM; a distilled model's own: ddim at its step count, consistency)")
    p.add_argument("--steps", type=int, default=None, help="grid steps (default: the model's: T for ddpm, 50 otherwise; "
                   "18 for EDM; a distilled model's step count; NFE can differ)")
    p.add_argument("--sigmas", default=None, metavar="LIST", help="explicit noise levels instead of --steps/--spacing, "
                   "comma-separated and decreasing, e.g. 80,0.8 for a 2-step consistency sample")
    p.add_argument("--spacing", default=None, choices=["uniform", "trailing", "leading", "karras"],
                   help="the sigma grid: a subsequence of the model's timesteps, or Karras et al.'s rho=7 spacing "
                        "(default: the model's: uniform for DDPM-style models, karras for EDM)")
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
    guidance.add_argument("--prompt", action="append", dest="prompt_list", metavar="TEXT",
                          help="text-to-image: a prompt (repeat the flag for several; one grid row each)")
    guidance.add_argument("--prompts", metavar="FILE", help="text-to-image: a file with one prompt per line")
    guidance.add_argument("--negative-prompt", metavar="TEXT", help="text-to-image: what to steer away from: it "
                          "replaces the empty prompt in the unconditional half of guidance")
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
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per network call (default: 256 on a CPU; on a GPU as many as fill 70%% of its memory)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the network (default: on a GPU for jobs of 100,000+ image evaluations)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/generated)")
    p.add_argument("--grid", action=argparse.BooleanOptionalAction, default=True, help="write one grid PNG (default: on)")
    p.add_argument("--individual", action="store_true", help="also write one PNG per image")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="EMA (default) or raw weights")
    p.add_argument("--no-clip", action="store_true", help="do not clamp the x0 estimate to [-1, 1]")
    p.add_argument("--threshold", type=float, default=None, metavar="PERCENTILE",
                   help="dynamic thresholding of the x0 estimate at this percentile, e.g. 0.995 (Imagen)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_sample)


def add_samplers_parser(sub) -> None:
    p = sub.add_parser("samplers", help="list the samplers", description="List every sampler with a one-line description.")
    p.set_defaults(handler=run_samplers)


def run_samplers(args: argparse.Namespace) -> int:
    print(f"{'sampler':<16} {'NFE for N steps':<16} {'kind':<14} description")
    for name, info in SAMPLERS.items():
        kind = "stochastic" if info.stochastic else f"ODE, order {info.order}"
        nfe = ("set by --tol" if info.nfe is None else "N" if info.nfe(10) == 10 else "2N - 1" if info.nfe(10) == 19
               else f"{info.nfe(10)} for N=10")
        print(f"{name:<16} {nfe:<16} {kind:<14} {info.description}")
    return 0


SAMPLER_OPTIONS = ("eta", "variance", "churn", "rtol", "max_nfe", "predictor", "corrector_steps", "snr")


def run_sample(args: argparse.Namespace) -> int:
    with distributed.session(args.device) as info:  # under torchrun: every process samples a share, rank 0 writes
        model = load_model(args.model, weights=args.weights, device=info.device)
        options = {k: getattr(args, k) for k in SAMPLER_OPTIONS if getattr(args, k) is not None}
        guidance, cond = _guidance_options(args, model)
        num = args.num if args.num is not None else (8 if cond is not None else 64)
        if num < 1:
            raise DifflabError(f"-n must be at least 1, got {num}")
        per_row, given, captions = None, {}, None
        if isinstance(cond, list):  # prompts: one row per prompt, the prompt written under each image
            captions = [p for p in cond for _ in range(num)]
            given, per_row = {"prompts": captions}, num
        elif cond is not None:
            given, per_row = {"cond": cond_repeat_interleave(cond, num)}, num  # one row per class
        total = len(captions) if captions else cond_len(given.get("cond")) or num
        param, stats = model.parameterization, {}
        out = Path(args.out) if args.out else _default_out(model)
        # before the sampling, which can take hours, not after it (rank 0 writes; every rank learns of a failure)
        distributed.main_first(lambda: _check_writable(out, "" if args.out else " (give --out FOLDER to write "
                                                                                  "elsewhere)"))
        sigmas = _parse_sigmas(args.sigmas, param)
        if sigmas is not None and (args.steps is not None or args.spacing is not None):
            raise DifflabError("--sigmas gives the noise levels itself: leave out --steps and --spacing")
        sampler, steps, spacing = model.sampling(args.sampler, len(sigmas) - 1 if sigmas is not None else args.steps,
                                                 args.spacing)
        with autocast(model.device):
            images = generate_sharded(model, total, sampler=sampler, steps=steps, spacing=spacing, sigmas=sigmas,
                                      rho=args.rho, seed=args.seed, batch_size=args.batch_size, compile=args.compile,
                                      clip=False if args.no_clip else None, threshold=args.threshold,
                                      progress=not args.quiet and info.is_main, stats=stats, **given, **guidance,
                                      **options)
        if not info.is_main:
            return 0
        extras = {"spacing": args.spacing if args.spacing not in (None, param.default_spacing) else None,
                  "sigmas": "-".join(f"{v:g}" for v in sigmas[:-1].tolist()) if sigmas is not None else None,
                  "threshold": args.threshold, "weights": args.weights if args.weights != "ema" else None,
                  "noclip": True if args.no_clip else None,
                  "class": args.classes.replace(",", "+").replace("/", "-").replace(" ", "") if args.classes else None,
                  "prompts": _slug(cond) if captions else None, "neg": "yes" if args.negative_prompt else None,
                  "cfg": guidance.get("guidance_scale"), "rescale": guidance.get("guidance_rescale") or None,
                  "clf": guidance.get("classifier_scale"), **options}
        tag = f"{sampler}_{steps}steps_seed{args.seed}" + "".join(
            f"_{k}{'' if v is True else v}" for k, v in extras.items() if v is not None)
        written = _write(images, out, tag, per_row, args, captions)
        seconds = stats["seconds"]
        print(f"{len(images)} images, {stats['nfe']} network evaluations (NFE) each, {seconds:.1f} s "
              f"({seconds / len(images) * 1000:.1f} ms/image) -> " + ", ".join(str(w) for w in written))
    return 0


def _parse_sigmas(text: str | None, param) -> torch.Tensor | None:
    """--sigmas 80,0.8 -> the checked grid (float64, ending with 0)."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DifflabError(f"--sigmas must be comma-separated numbers, e.g. 80,0.8, got '{text}'") from None
    return check_sigmas(values, param)


def _default_out(model: Model) -> Path:
    """RUN/generated; for a diffusers model ./generated/<name> (never inside a downloaded folder); for a single-file
    model NAME-generated beside the file."""
    if model.config.get("format") == "diffusers":
        return Path("generated") / (re.sub(r"[^\w.-]+", "-", model.config["source"]).strip("-.") or "diffusers")
    if model.checkpoint.is_file():
        return model.checkpoint.with_name(f"{model.checkpoint.stem}-generated")
    return _run_folder(model) / "generated"


def _run_folder(model: Model) -> Path:
    checkpoint = model.checkpoint
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint


def _check_writable(folder: Path, hint: str) -> None:
    """A one-line error unless ``folder`` can be created and written to."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise DifflabError(f"cannot write images to '{folder}': {e.strerror}{hint}") from None


def _slug(prompts: list[str]) -> str:
    """A short file-name tag for a list of prompts (the first one's words, and how many there are)."""
    words = "-".join("".join(ch for ch in w if ch.isalnum()) for w in prompts[0].split()[:6]).strip("-") or "empty"
    return words + (f"+{len(prompts) - 1}more" if len(prompts) > 1 else "")


def _write(images: torch.Tensor, out: Path, tag: str, per_row: int | None, args: argparse.Namespace,
           captions: list[str] | None = None) -> list[Path]:
    """The grid (one row per class or prompt) and, with --individual, one PNG per image (and, for prompts, a
    prompts.txt naming each file's prompt)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if args.grid:
        written.append(save_grid(images, out / f"{tag}.png", nrow=per_row, captions=captions))
    if args.individual:
        for i, img in enumerate(to_pil(images)):
            img.save(out / f"{tag}_{i:05d}.png")
        written.append(out / f"{tag}_*.png")
        if captions:
            (out / f"{tag}_prompts.txt").write_text("".join(f"{tag}_{i:05d}.png\t{p}\n" for i, p in enumerate(captions)),
                                                   encoding="utf-8")
    return written


def _guidance_options(args: argparse.Namespace, model: Model) -> tuple[dict, torch.Tensor | list[str] | None]:
    """(generate() guidance keywords, the classes or prompts to sample, or None) from the sample flags."""
    prompts = list(args.prompt_list or []) + (read_prompts(args.prompts) if args.prompts else [])
    if model.takes_prompts:
        if args.classes is not None or args.classifier:
            raise DifflabError("this is a text-to-image model: give --prompt or --prompts instead of --class/--classifier")
        prompts = prompts or model.conditioner.prompts
        if not prompts:
            raise DifflabError("give a --prompt (this model records no default prompts)")
        return {"guidance_scale": _guidance_scale(args, model, "caption dropout, so the empty prompt"),
                "guidance_rescale": args.guidance_rescale, "negative_prompt": args.negative_prompt}, prompts
    if prompts or args.negative_prompt is not None:
        raise DifflabError("--prompt, --prompts and --negative-prompt need a text-to-image model (difflab train "
                           "--text-encoder); this one is " + ("class-conditional: use --class" if model.conditioner
                                                               else "unconditional"))
    classes = "all" if args.classes is None else args.classes
    if args.classifier:
        if args.guidance_scale is not None or args.guidance_rescale:
            raise DifflabError("use either classifier-free guidance (--guidance-scale, --guidance-rescale) or a "
                               "--classifier, not both")
        classifier = load_classifier(args.classifier, device=model.device)
        if model.conditioner is not None:
            raise DifflabError("--classifier guides an unconditional model; this one is class-conditional "
                               "(use --guidance-scale)")
        labels = torch.tensor(parse_classes(classes, classifier.class_names))
        return {"classifier": classifier, "classifier_scale": args.classifier_scale}, labels
    if args.classifier_scale != 1.0:
        raise DifflabError("--classifier-scale applies only with --classifier")
    if model.conditioner is None:
        if args.classes is not None or args.guidance_scale is not None:
            raise DifflabError("this model is unconditional: --class and --guidance-scale need a model trained with "
                               "--conditional (or classifier guidance: --classifier RUN)")
        if args.guidance_rescale:
            raise DifflabError("--guidance-rescale applies only with classifier-free guidance")
        return {}, None
    labels = model.conditioner.parse(classes)
    scale = _guidance_scale(args, model, "label dropout, so its null class")
    return {"guidance_scale": scale, "guidance_rescale": args.guidance_rescale}, labels


def _guidance_scale(args: argparse.Namespace, model: Model, untrained: str) -> float:
    """--guidance-scale, or 3 for a model that learned its null condition (1, plain conditional, for one that did
    not); a warning when a scale other than 1 meets an untrained null condition."""
    scale = args.guidance_scale if args.guidance_scale is not None else default_guidance_scale(model)
    if scale != 1.0 and not model.conditioner.trained_null:
        print(f"warning: this model was trained without {untrained} is untrained; guidance scales other than 1 "
              "extrapolate from noise", file=sys.stderr)
    return scale
