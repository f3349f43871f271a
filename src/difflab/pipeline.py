"""Build a model from its JSON config, load a trained one, and generate images with any sampler.

    import difflab
    model = difflab.load_model("runs/digits")            # newest checkpoint, EMA weights
    images = difflab.sample(model, n=16, sampler="ddim", steps=50, seed=0)   # (16, C, H, W) in [0, 1]
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from difflab.checkpoint import load_state, load_weights, read_config, resolve_checkpoint
from difflab.denoisers import Denoiser
from difflab.errors import DifflabError
from difflab.guidance import classifier_free_guidance, classifier_guidance, clip_x0, dynamic_threshold
from difflab.nn import UNet, UNetConfig
from difflab.samplers import SAMPLERS, get_sampler
from difflab.schedules import make_schedule, sampling_sigmas

MODEL_FORMAT = "difflab-model-1"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise DifflabError(f"unknown device '{device}' (use cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DifflabError("--device cuda was asked for but PyTorch sees no CUDA GPU (use --device cpu)")
    return device


def model_config(unet: UNetConfig, *, prediction: str, schedule: str, timesteps: int, data: dict) -> dict:
    """The JSON that rebuilds a trained denoiser (stored as config.json in every checkpoint)."""
    return {
        "format": MODEL_FORMAT,
        "unet": dataclasses.asdict(unet),
        "prediction": prediction,
        "schedule": {"name": schedule, "timesteps": timesteps},
        "data": data,  # name, channels, image_size, class_names: what the model generates
    }


def build_denoiser(config: dict) -> Denoiser:
    """A freshly initialised denoiser (U-Net + preconditioning) from a :func:`model_config` dict."""
    if config.get("format") != MODEL_FORMAT:
        raise DifflabError(f"not a difflab model config (format {config.get('format')!r}, expected {MODEL_FORMAT!r})")
    try:
        unet = UNet(UNetConfig(**config["unet"]))
        schedule = make_schedule(config["schedule"]["name"], config["schedule"]["timesteps"])
        return Denoiser(unet, schedule, config["prediction"])
    except (KeyError, TypeError) as e:
        raise DifflabError(f"model config is incomplete or has unknown fields: {e}") from None


@dataclass
class Model:
    """A trained denoiser with the config that describes it."""

    denoiser: Denoiser
    config: dict
    checkpoint: Path | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        u = self.config["unet"]
        return (u["in_channels"], u["image_size"], u["image_size"])

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def num_classes(self) -> int | None:
        """Number of classes of a class-conditional model (None: unconditional)."""
        return self.config["unet"].get("num_classes")

    @property
    def class_names(self) -> list[str] | None:
        return self.config["data"].get("class_names")


def parse_classes(spec: str | int | list | None, class_names: list[str] | None, num_classes: int | None) -> list[int] | None:
    """Class labels from what a user typed: an index ("3"), a name ("sandal"), a comma list ("0,2,sandal") or
    "all"; None stays None. One-line errors for anything that is not a class of the model."""
    if spec is None:
        return None
    if num_classes is None:
        raise DifflabError("this model is unconditional: it has no classes (train with --conditional, or guide it "
                           "with a classifier: --classifier)")
    names = [c.lower() for c in (class_names or [str(i) for i in range(num_classes)])]
    items = spec if isinstance(spec, (list, tuple)) else [spec] if isinstance(spec, int) else str(spec).split(",")
    labels = []
    for item in (str(i).strip().lower() for i in items):
        if not item:
            raise DifflabError("an empty class name: give a class index, a name, a comma list or 'all'")
        if item == "all":
            labels.extend(range(num_classes))
        elif item in names:  # a name first: a folder class called "3" need not be class index 3
            labels.append(names.index(item))
        elif item.isascii() and item.isdigit() and int(item) < num_classes:
            labels.append(int(item))
        else:
            raise DifflabError(f"unknown class '{item}' (the model's classes: "
                               f"{', '.join(f'{i}={c}' for i, c in enumerate(class_names or names))})")
    return labels


def guide(denoiser, *, guidance_scale: float | None = None, guidance_rescale: float = 0.0, classifier=None,
          classifier_scale: float = 1.0):
    """Wrap a model's denoiser with classifier-free guidance (a class-conditional model, ``guidance_scale``) or
    classifier guidance (any model and a noise-aware ``classifier``); with neither it is returned unchanged."""
    want = getattr(getattr(denoiser, "net", None), "config", None)  # the U-Net's config, when there is one
    num_classes = getattr(want, "num_classes", None)
    if classifier is not None:
        have = getattr(getattr(classifier, "net", None), "config", None)
        if want is not None and have is not None and (want.image_size, want.in_channels) != (have.image_size, have.in_channels):
            raise DifflabError(f"the classifier sees {have.in_channels}x{have.image_size}x{have.image_size} images but the "
                               f"model makes {want.in_channels}x{want.image_size}x{want.image_size}: train it on the same data")
        return classifier_guidance(denoiser, classifier, classifier_scale)
    if guidance_scale is not None:
        if num_classes is None:
            raise DifflabError("classifier-free guidance needs a class-conditional model (train it with --conditional)")
        return classifier_free_guidance(denoiser, guidance_scale, null_label=num_classes, rescale=guidance_rescale)
    if guidance_rescale:
        raise DifflabError("guidance rescale applies only with classifier-free guidance (set a guidance scale)")
    return denoiser


def load_model(path: str | Path, *, weights: str = "ema", device: str | torch.device = "auto") -> Model:
    """Load a run folder (its newest checkpoint) or a checkpoint folder; EMA weights by default."""
    checkpoint = resolve_checkpoint(path)
    config = read_config(checkpoint)
    denoiser = build_denoiser(config)
    state = load_weights(checkpoint, weights)
    load_state(denoiser.net, state, checkpoint)
    return Model(denoiser.to(resolve_device(device)).eval(), config, checkpoint)


def initial_noise(shape: tuple[int, ...], sigma_max: float, generators: list[torch.Generator], device) -> torch.Tensor:
    """x at the first noise level. A DDPM starts from x_T ~ N(0, I), i.e. x = x_T / sqrt(abar_T) in sigma
    coordinates: standard deviation sqrt(1 + sigma_max^2)."""
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
    return noise * math.sqrt(1.0 + sigma_max**2)


class CountingDenoiser:
    """Wraps a denoiser and counts its evaluations (NFE: network function evaluations)."""

    def __init__(self, denoiser):
        self.denoiser, self.nfe = denoiser, 0

    def __call__(self, x, sigma, cond=None):
        self.nfe += 1
        return self.denoiser(x, sigma, cond)


def sampler_options(sampler: str, options: dict) -> dict:
    """Check that every option applies to the sampler (one-line error otherwise)."""
    import inspect

    accepted = set(inspect.signature(get_sampler(sampler)).parameters) - {"denoiser", "x", "sigmas", "cond", "generator", "callback"}
    wrong = sorted(set(options) - accepted)
    if wrong:
        takes = ", ".join(sorted(accepted)) or "no options"
        raise DifflabError(f"option(s) {', '.join(wrong)} do not apply to sampler '{sampler}' (it takes: {takes})")
    return options


@torch.no_grad()
def generate(
    denoiser: Denoiser,
    image_shape: tuple[int, int, int],
    n: int,
    *,
    sampler: str = "ddim",
    steps: int | None = None,
    spacing: str = "uniform",
    rho: float = 7.0,
    seed: int = 0,
    batch_size: int = 256,
    clip: bool = True,
    threshold: float | None = None,
    cond: torch.Tensor | None = None,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    classifier=None,
    classifier_scale: float = 1.0,
    progress: bool = False,
    stats: dict | None = None,
    **options,
) -> torch.Tensor:
    """Sample ``n`` images in [-1, 1] (float32, on the denoiser's device).

    Image i always comes from seed ``seed + i``, whatever the batch size. ``steps`` defaults to T for
    DDPM and 50 otherwise; ``spacing`` picks the sigma grid (uniform, trailing, leading, karras with ``rho``);
    ``clip`` clamps the x0 estimate to [-1, 1], ``threshold`` (a percentile such as 0.995) applies
    dynamic thresholding instead. ``cond`` holds one class label per image; with a class-conditional model
    ``guidance_scale`` turns on classifier-free guidance (0 = unconditional, 1 = conditional, more = stronger;
    ``guidance_rescale`` in [0, 1]); a noise-aware ``classifier`` (:func:`difflab.load_classifier`) guides any
    model with ``classifier_scale``. ``options`` go to the sampler (``eta``, ``variance``, ``churn``, ...).
    When ``stats`` is a dict it receives ``nfe`` (network evaluations per image) and ``seconds``."""
    if n < 1:
        raise DifflabError(f"the number of images must be at least 1, got {n}")
    sample_fn = get_sampler(sampler)
    sampler_options(sampler, options)
    if batch_size < 1:
        raise DifflabError(f"the batch size must be at least 1, got {batch_size}")
    schedule = denoiser.schedule
    if steps is None:
        steps = schedule.T if sampler == "ddpm" else 50
    sigmas = sampling_sigmas(schedule, steps, spacing, rho)
    device = next(denoiser.parameters()).device
    if cond is not None and len(cond) != n:
        raise DifflabError(f"got {len(cond)} class labels for {n} images")
    if classifier is not None and cond is None:
        raise DifflabError("classifier guidance needs the classes to generate (class labels)")
    den = guide(denoiser, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, classifier=classifier,
                classifier_scale=classifier_scale)
    den = dynamic_threshold(den, threshold) if threshold is not None else clip_x0(den) if clip else den
    out, nfe, started = [], 0, time.perf_counter()
    cost = SAMPLERS[sampler].nfe
    total = n * cost(steps) if cost is not None else None
    with tqdm(total=total, desc=f"sampling ({sampler}, {steps} steps)", unit="img-eval", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            gens = [torch.Generator().manual_seed(seed + i) for i in range(start, stop)]
            x = initial_noise(image_shape, float(sigmas[0]), gens, device)
            c = cond[start:stop].to(device) if cond is not None else None
            counted = CountingDenoiser(den)
            cb = (lambda i, s, x_, x0, k=stop - start: bar.update(k)) if progress else None
            out.append(sample_fn(counted, x, sigmas, cond=c, generator=gens, callback=cb, **options))
            nfe = max(nfe, counted.nfe)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if stats is not None:
        stats.update(nfe=nfe, seconds=time.perf_counter() - started)
    return torch.cat(out)


def sample(
    model: Model | str | Path,
    n: int = 16,
    *,
    classes: str | int | list | None = None,
    output: str = "tensor",
    device: str | torch.device = "auto",
    **kwargs,
):
    """Generate ``n`` images from a :class:`Model` or a run/checkpoint path.

    With ``classes`` (an index, a name, a list of them, or "all") it generates ``n`` images of each class,
    class by class, e.g. ``sample(model, 8, classes="all", guidance_scale=3.0)``; for an unconditional model
    pass a ``classifier`` too. Returns a float tensor (N, C, H, W) in [0, 1] (``output="tensor"``) or a list
    of PIL images (``output="pil"``). Other keyword arguments as in :func:`generate` (sampler, steps, seed, ...)."""
    if not isinstance(model, Model):
        model = load_model(model, device=device)
    if classes is not None:
        clf = kwargs.get("classifier")
        names = clf.class_names if clf is not None else model.class_names
        labels = parse_classes(classes, names, len(names) if clf is not None else model.num_classes)
        kwargs["cond"] = torch.tensor(labels).repeat_interleave(n)
        n = len(kwargs["cond"])
    images = generate(model.denoiser, model.image_shape, n, **kwargs)
    if output == "pil":
        from difflab.viz import to_pil

        return to_pil(images)
    if output != "tensor":
        raise DifflabError(f"output must be 'tensor' or 'pil', got '{output}'")
    return ((images.clamp(-1, 1) + 1) / 2).cpu()
