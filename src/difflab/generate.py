"""Generate images from a model with any sampler: per-seed batches, guidance, decoding, sharding over processes.

    import difflab
    model = difflab.load("runs/digits")                                      # newest checkpoint, EMA weights
    images = difflab.sample(model, 16, sampler="ddim", steps=50, seed=0)     # (16, C, H, W) in [0, 1]
    pixels = difflab.generate(model, 16)                                     # (16, C, H, W) in [-1, 1]

Sampling happens in the model's space (pixels, or latents for a latent model); the result is decoded to pixels
at the end. Image i always comes from seed ``seed + i``, whatever the batch size or the number of processes.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from difflab import distributed
from difflab.conditioning import (
    Cond,
    check_prompts,
    cond_len,
    cond_repeat_interleave,
    cond_slice,
    cond_to,
    parse_classes,
)
from difflab.denoisers import Denoiser, DenoiserFn
from difflab.devices import autocast, compile_module, to_device
from difflab.errors import DifflabError
from difflab.guidance import classifier_free_guidance, classifier_guidance, clip_x0, dynamic_threshold
from difflab.models import Model, NoisyClassifier, load_model
from difflab.samplers import SAMPLERS, get_sampler
from difflab.viz import to_pil


class CountingDenoiser:
    """Wraps a denoiser and counts its evaluations (NFE: network function evaluations)."""

    def __init__(self, denoiser: DenoiserFn):
        self.denoiser, self.nfe = denoiser, 0

    def __call__(self, x, sigma, cond=None):
        self.nfe += 1
        return self.denoiser(x, sigma, cond)


def sampler_options(sampler: str, options: dict) -> dict:
    """Check that every option applies to the sampler (one-line error otherwise)."""
    accepted = set(inspect.signature(get_sampler(sampler)).parameters) - {"denoiser", "x", "sigmas", "cond", "generator",
                                                                          "callback"}
    wrong = sorted(set(options) - accepted)
    if wrong:
        takes = ", ".join(sorted(accepted)) or "no options"
        raise DifflabError(f"option(s) {', '.join(wrong)} do not apply to sampler '{sampler}' (it takes: {takes})")
    return options


def check_sigmas(sigmas, param) -> torch.Tensor:
    """An explicit sampling grid as float64 (steps + 1,), ending with 0 (added when missing), strictly decreasing,
    inside the model's noise range (one-line errors)."""
    grid = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    if len(grid) == 0 or not bool(torch.isfinite(grid).all()):
        raise DifflabError("--sigmas must be finite numbers, e.g. 80,0.8")
    if grid[-1] != 0:
        grid = torch.cat([grid, grid.new_zeros(1)])
    if len(grid) < 2 or not bool((grid[:-1] > grid[1:]).all()):
        raise DifflabError(f"--sigmas must be strictly decreasing and positive, got {[float(s) for s in sigmas]}")
    if grid[0] > param.sigma_max * (1 + 1e-6) or grid[-2] < param.sigma_min * (1 - 1e-6):
        raise DifflabError(f"--sigmas must lie within the model's noise levels [{param.sigma_min:g}, "
                           f"{param.sigma_max:g}] (then 0), got {[float(s) for s in sigmas]}")
    return grid


def default_guidance_scale(model: Model) -> float:
    """The classifier-free guidance scale a conditional model samples with unless told: 3 when it learned its null
    condition (label or caption dropout > 0), else 1 -- plain conditional sampling."""
    if model.distillation and model.distillation.get("guidance_scale") is not None:
        return 1.0  # guidance is folded into the distilled model
    if model.config.get("guidance_scale") is not None:
        return float(model.config["guidance_scale"])  # a model that states its own (Stable Diffusion: 7.5)
    return 3.0 if model.conditioner.trained_null else 1.0


def guide(model: Model, *, guidance_scale: float | None = None, guidance_rescale: float = 0.0,
          negative_prompt: str | None = None, classifier: NoisyClassifier | None = None,
          classifier_scale: float = 1.0) -> DenoiserFn:
    """The model's denoiser wrapped with classifier-free guidance (a conditional model, ``guidance_scale``) or
    classifier guidance (any model and a noise-aware ``classifier``); with neither it is returned unchanged. A
    ``negative_prompt`` (text models) replaces the empty prompt in the unconditional half of guidance: the samples
    are pushed away from it."""
    if negative_prompt is not None and (guidance_scale is None or not model.takes_prompts):
        raise DifflabError("a negative prompt needs a text-to-image model and a guidance scale")
    if negative_prompt is not None and guidance_scale == 1:
        warnings.warn("at guidance scale 1 the negative prompt has no effect (only the conditional estimate is used); "
                      "use a scale above 1", stacklevel=3)
    if classifier is not None and model.takes_prompts:
        raise DifflabError("classifier guidance needs an unconditional model; a text-to-image model is guided by its "
                           "prompt (--guidance-scale)")
    if classifier is not None:
        have, want = classifier.input_shape, model.shape
        if have != want:
            raise DifflabError(f"the classifier sees {'x'.join(map(str, have))} images but the model makes "
                               f"{'x'.join(map(str, want))}: train it on the same data")
        return classifier_guidance(model.denoiser, classifier.to(model.device), classifier_scale)
    if guidance_scale is not None:
        if model.conditioner is None:
            raise DifflabError("classifier-free guidance needs a conditional model (train it with --conditional)")
        null = model.conditioner.null(1) if negative_prompt is None else model.conditioner.encode([negative_prompt])
        return classifier_free_guidance(model.denoiser, guidance_scale, null_cond=null, rescale=guidance_rescale)
    if guidance_rescale:
        raise DifflabError("guidance rescale applies only with classifier-free guidance (set a guidance scale)")
    return model.denoiser


@torch.no_grad()
def generate(model: Model, n: int, *, sampler: str | None = None, steps: int | None = None, spacing: str | None = None,
             rho: float = 7.0, sigmas: list[float] | torch.Tensor | None = None, seed: int = 0,
             batch_size: int | None = None, compile: bool | None = None, clip: bool | None = None,
             threshold: float | None = None, cond: Cond = None, prompts: list[str] | None = None,
             guidance_scale: float | None = None, guidance_rescale: float = 0.0, negative_prompt: str | None = None,
             classifier: NoisyClassifier | None = None, classifier_scale: float = 1.0, progress: bool = False,
             stats: dict | None = None, **options) -> torch.Tensor:
    """Sample ``n`` images: pixels in [-1, 1], float32 (N, C, H, W), on the model's device.

    ``sampler``, ``steps`` and ``spacing`` default to the model's own choice (DDIM, 50 steps, uniform for a DDPM;
    Heun, 18 steps, Karras for EDM; ``ddpm`` takes all T steps); ``spacing`` picks the sigma grid (uniform,
    trailing, leading, karras with ``rho``); ``sigmas`` gives the noise levels instead (decreasing; a final 0 is
    added when missing), e.g. the multistep consistency sampler's [80, 0.8]. ``clip`` clamps the x0 estimate to
    [-1, 1] (default: in pixel space only), ``threshold`` (a percentile such as 0.995) applies dynamic thresholding instead. ``cond`` holds one
    condition per image (class labels, or encoded prompts); a text-to-image model takes ``prompts`` (one per image)
    instead, encoded once here. With a conditional model ``guidance_scale`` turns on classifier-free
    guidance (0 = unconditional, 1 = conditional, more = stronger; ``guidance_rescale`` in [0, 1]; a text model's
    ``negative_prompt`` takes the empty prompt's place); a noise-aware
    ``classifier`` (:func:`difflab.load_classifier`) guides any model with ``classifier_scale``. ``options`` go
    to the sampler (``eta``, ``variance``, ``churn``, ...). When ``stats`` is a dict it receives ``nfe`` (network
    evaluations per image) and ``seconds``.

    ``batch_size``: images per network call (default: :func:`default_batch_size`, as many as fill a GPU). ``compile``
    runs the network through ``torch.compile`` (default: on a GPU for long jobs, :func:`compile_pays`); it is compiled
    once per network and batch shape and reused by later calls."""
    if n < 1:
        raise DifflabError(f"the number of images must be at least 1, got {n}")
    param = model.parameterization
    if sigmas is not None:  # an explicit grid: its length is the number of steps
        sigmas = check_sigmas(sigmas, param)
        if steps is not None and steps != len(sigmas) - 1:
            raise DifflabError(f"{len(sigmas) - 1} steps on the given sigmas, but steps={steps}")
        steps = len(sigmas) - 1
    sampler, steps, spacing = model.sampling(sampler, steps, spacing)
    sample_fn = get_sampler(sampler)
    sampler_options(sampler, options)
    if batch_size is not None and batch_size < 1:
        raise DifflabError(f"the batch size must be at least 1, got {batch_size}")
    why = model.sampling_mismatch(sampler, steps, "explicit sigmas" if sigmas is not None else spacing, guidance_scale,
                                  options)
    if why:
        warnings.warn(why, stacklevel=2)
    sigmas = param.sampling_sigmas(steps, spacing, rho) if sigmas is None else sigmas
    if prompts is not None:
        if not model.takes_prompts:
            raise DifflabError("prompts need a text-to-image model (train one with --text-encoder)")
        if cond is not None:
            raise DifflabError("give either prompts or cond, not both")
        cond = model.conditioner.encode(prompts)  # once: reused at every step and in both halves of guidance
    elif cond is None and model.takes_prompts:  # no prompt: the empty one, i.e. the unconditional model
        cond = model.conditioner.null(n)
    if cond is not None and cond_len(cond) != n:
        raise DifflabError(f"got {cond_len(cond)} conditions for {n} images")
    if classifier is not None and cond is None:
        raise DifflabError("classifier guidance needs the classes to generate (class labels)")
    cost = SAMPLERS[sampler].nfe
    guided = guidance_scale is not None and guidance_scale != 1 and model.conditioner is not None
    batch_size = batch_size or default_batch_size(model, n, guided)
    if compile if compile is not None else compile_pays(model.device, n, cost(steps) if cost else 50):
        model = dataclasses.replace(model, denoiser=compiled(model.denoiser, asked=compile is not None))
    den = guide(model, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, negative_prompt=negative_prompt,
                classifier=classifier, classifier_scale=classifier_scale)
    clip = model.encoder.pixel_space if clip is None else clip
    den = dynamic_threshold(den, threshold) if threshold is not None else clip_x0(den) if clip else den
    device, std = model.device, param.prior_std(float(sigmas[0]))
    out, nfe, started = [], 0, time.perf_counter()
    with tqdm(total=n * cost(steps) if cost is not None else None, desc=f"sampling ({sampler}, {steps} steps)",
              unit="img-eval", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            gens = [torch.Generator().manual_seed(seed + i) for i in range(start, stop)]
            x = to_device(torch.stack([torch.randn(model.shape, generator=g) for g in gens]), device) * std  # prior
            counted = CountingDenoiser(den)
            cb = (lambda i, s, x_, x0, k=stop - start: bar.update(k)) if progress else None
            x = sample_fn(counted, x, sigmas, cond=cond_to(cond_slice(cond, start, stop), device), generator=gens,
                          callback=cb, **options)
            out.append(model.encoder.decode(x).clamp(-1, 1))  # to pixels
            nfe = max(nfe, counted.nfe)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if stats is not None:
        stats.update(nfe=nfe, seconds=time.perf_counter() - started)
    return torch.cat(out)


def default_batch_size(model: Model, n: int, guided: bool = False) -> int:
    """Images per network call when none is given: 256 on a CPU (memory is not the limit there, and larger batches
    are no faster); on a GPU as many as fill 70% of its free memory, measured with one probe of 8 images (a guided
    batch counts twice) through the network and the decoder, in the caller's precision -- a power of two up to
    4096, never more than ``n`` needs."""
    if model.device.type != "cuda":
        return 256
    device = model.device
    probe = 8 * (2 if guided else 1)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        x = torch.zeros(probe, *model.shape, device=device)
        cond = model.conditioner.null(probe, device) if model.conditioner is not None else None
        model.encoder.decode(model.denoiser(x, torch.ones(probe, device=device), cond))
    per_image = max(1, torch.cuda.max_memory_allocated(device) - before) / probe
    return fill_batch(per_image, torch.cuda.mem_get_info(device)[0], guided, n)


def fill_batch(per_image_bytes: float, free_bytes: int, guided: bool, n: int) -> int:
    """The largest power of two up to 4096 whose images (twice as many when guided) take at most 70% of
    ``free_bytes`` (at least 1), and no larger than the power of two that holds ``n``."""
    images = 0.7 * free_bytes / (per_image_bytes * (2 if guided else 1))
    batch = 1
    while batch * 2 <= min(images, 4096):
        batch *= 2
    return min(batch, 1 << max(0, (n - 1).bit_length()))


def compile_pays(device: torch.device, n: int, nfe: int) -> bool:
    """Whether compiling the network is worth its warm-up (tens of seconds): on a GPU, for jobs of at least 100,000
    image evaluations (2,000 images at 50 steps, an FID run); never on a CPU, where the warm-up is minutes."""
    return torch.device(device).type == "cuda" and n * nfe >= 100_000


class _Compiled:
    """Holds a network's compiled version beside it; a copy (deepcopy, pickle) of the network does not carry it
    (it would wrap the original), it compiles afresh."""

    def __init__(self, module):
        self.module = module

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return type(None), ()


def compiled(denoiser: Denoiser, asked: bool = True) -> Denoiser:
    """The denoiser with ``torch.compile`` of its network, compiled once per network (kept with it, outside its
    submodules and state dict) and once per batch shape by torch (``asked``: see devices.compile_module)."""
    net = denoiser.net
    holder = net.__dict__.get("_difflab_compiled")
    if holder is None:
        holder = _Compiled(compile_module(net, asked=asked))
        object.__setattr__(net, "_difflab_compiled", holder)  # not a submodule: no keys in its state dict
    return Denoiser(holder.module, denoiser.parameterization)


def generate_sharded(model: Model, n: int, *, seed: int = 0, cond: Cond = None, prompts: list[str] | None = None,
                     **kwargs) -> torch.Tensor:
    """:func:`generate` split across the processes of a torchrun job: each rank samples its shard of the ``n``
    images (image i still from seed ``seed + i``) and every rank gets all ``n``, identical to one process
    sampling them all. In a single process it is :func:`generate`."""
    if n < 1:
        raise DifflabError(f"the number of images must be at least 1, got {n}")
    if cond is not None and cond_len(cond) != n:
        raise DifflabError(f"cond has {cond_len(cond)} entries for {n} images")
    if prompts is not None and len(prompts) != n:
        raise DifflabError(f"got {len(prompts)} prompts for {n} images")
    start, stop = distributed.shard_range(n, distributed.rank(), distributed.world_size())
    if prompts is not None:
        kwargs["prompts"] = prompts[start:stop]
    if stop > start:
        local = generate(model, stop - start, seed=seed + start, cond=cond_slice(cond, start, stop), **kwargs)
    else:  # more processes than images: this one contributes nothing but must join the gather
        local = torch.empty((0, *model.image_shape), device=model.device)
    return distributed.gather_shards(local, n)


def sample(model: Model | str | Path, n: int = 16, *, classes: str | int | list | None = None,
           prompts: str | list[str] | None = None, output: str = "tensor", device: str | torch.device = "auto",
           **kwargs):
    """Generate ``n`` images from a :class:`~difflab.models.Model` or a run/checkpoint path.

    With ``classes`` (an index, a name, a list of them, or "all") it generates ``n`` images of each class,
    class by class, e.g. ``sample(model, 8, classes="all", guidance_scale=3.0)``; for an unconditional model
    pass a ``classifier`` too. A text-to-image model takes ``prompts`` (a prompt or a list) and makes ``n`` images
    of each, e.g. ``sample(model, 4, prompts=["a red circle"], guidance_scale=5, negative_prompt="a blue square")``.
    Returns a float tensor (N, C, H, W) in [0, 1] (``output="tensor"``) or a list
    of PIL images (``output="pil"``). Other keyword arguments as in :func:`generate` (sampler, steps, seed, ...);
    on a GPU the network runs under bf16 autocast."""
    if output not in ("tensor", "pil"):
        raise DifflabError(f"output must be 'tensor' or 'pil', got '{output}'")
    if not isinstance(model, Model):
        model = load_model(model, device=device)
    if classes is not None and model.takes_prompts:
        raise DifflabError("this is a text-to-image model: pass prompts, not classes")
    if prompts is not None:
        if classes is not None:
            raise DifflabError("give either classes or prompts, not both")
        kwargs["prompts"] = [p for p in check_prompts(prompts) for _ in range(n)]
        n = len(kwargs["prompts"])
    if classes is not None:
        clf = kwargs.get("classifier")
        if clf is None and model.conditioner is None:
            raise DifflabError("this model is unconditional: it has no classes (train with --conditional, or guide "
                               "it with a classifier: --classifier)")
        labels = torch.tensor(parse_classes(classes, clf.class_names if clf is not None else model.class_names))
        kwargs["cond"] = cond_repeat_interleave(labels, n)
        n = len(kwargs["cond"])
    with autocast(model.device):
        images = generate(model, n, **kwargs)
    return to_pil(images) if output == "pil" else ((images + 1) / 2).cpu()
