"""What a checkpoint holds and how to rebuild it: one :func:`load` for every kind of run.

    import difflab
    model = difflab.load("runs/digits")              # a Model: denoiser + encoder + conditioner + config
    clf = difflab.load("runs/digits-classifier")     # a NoisyClassifier: clf(x, sigma) -> logits

A checkpoint's ``config.json`` names its ``format``; :func:`build` turns the config into a freshly initialised
object of that format and :func:`load` fills in the weights (EMA by default). Configs written by earlier
versions of difflab (``difflab-model-1``, ``difflab-classifier-1``) are upgraded on reading.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from difflab.conditioning import ClassConditioner, TextConditioner, conditioner_from_config
from difflab.denoisers import Denoiser, Parameterization, parameterization_from_config
from difflab.devices import resolve_device
from difflab.encoders import LatentEncoder, PixelEncoder, encoder_from_config
from difflab.errors import DifflabError
from difflab.nn import UNet, UNetClassifier, UNetConfig
from difflab.nn.vae import Autoencoder, AutoencoderConfig
from difflab.schedules import NoiseSchedule
from difflab.tensors import append_dims, sigma_per_example
from difflab.training.checkpoint import (
    REQUIRED_FILES,
    checkpoint_folders,
    checkpoint_problem,
    load_state,
    read_model_files,
    resolve_checkpoint,
)

MODEL_FORMAT = "difflab-model-2"
CLASSIFIER_FORMAT = "difflab-classifier-2"
VAE_FORMAT = "difflab-vae-1"


@dataclass
class Model:
    """A trained diffusion model: its denoiser (network + parameterization), the encoder between pixels and the
    model's space (identity for pixel models), the conditioner that makes its conds (None: unconditional), the
    config that rebuilds it, and the checkpoint it came from."""

    denoiser: Denoiser
    encoder: PixelEncoder | LatentEncoder
    conditioner: ClassConditioner | TextConditioner | None
    config: dict
    checkpoint: Path | None = None

    @property
    def parameterization(self) -> Parameterization:
        return self.denoiser.parameterization

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the denoiser works on (latents for a latent model)."""
        u = self.config["unet"]
        return (u["in_channels"], u["image_size"], u["image_size"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images it generates."""
        d = self.config["data"]
        return (d["channels"], d["image_size"], d["image_size"]) if "channels" in d else self.shape

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def class_names(self) -> list[str] | None:
        return self.conditioner.class_names if isinstance(self.conditioner, ClassConditioner) else None

    @property
    def num_classes(self) -> int | None:
        return self.conditioner.num_classes if isinstance(self.conditioner, ClassConditioner) else None

    @property
    def takes_prompts(self) -> bool:
        """Whether it is a text-to-image model (conditioned on prompts)."""
        return isinstance(self.conditioner, TextConditioner)

    @property
    def distillation(self) -> dict | None:
        """What a distilled model was distilled for (``difflab distill``): method, teacher, sampler, steps, spacing,
        the guidance scale folded in; None for a model trained directly."""
        return self.config.get("distillation")

    def sampling(self, sampler: str | None = None, steps: int | None = None, spacing: str | None = None
                 ) -> tuple[str, int, str | None]:
        """(sampler, steps, spacing) with what is not given filled in: a distilled model's own settings (DDIM at the
        step count it was distilled to, on its trailing grid; the consistency sampler in one step), else its
        parameterization's defaults (spacing None: the parameterization's)."""
        made_for = self.distillation
        sampler = sampler or (made_for["sampler"] if made_for else self.parameterization.default_sampler)
        if made_for and sampler == made_for["sampler"]:
            return sampler, made_for["steps"] if steps is None else steps, spacing or made_for["spacing"]
        return sampler, self.parameterization.default_steps(sampler) if steps is None else steps, spacing

    def sampling_mismatch(self, sampler: str, steps: int, spacing: str | None, guidance_scale: float | None = None,
                          options: dict | None = None) -> str | None:
        """Why the settings do not suit a distilled model (None when they do, or for an undistilled model): a
        progressive student learned one grid and a consistency model one map, and other settings degrade them."""
        made_for = self.distillation
        if not made_for:
            return None
        want = f"{made_for['sampler']} with {made_for['steps']} step(s) on the {made_for['spacing']} grid"
        eta = (options or {}).get("eta", 0)
        if made_for["method"] == "progressive":
            if sampler not in ("ddim", "euler") or steps != made_for["steps"] or eta or \
                    (spacing or made_for["spacing"]) != made_for["spacing"]:
                asked = (f"{sampler} with {steps} step(s){f' and eta {eta:g}' if eta else ''}"
                         f"{' on explicit sigmas' if spacing == 'explicit sigmas' else ''}")
                return (f"this student was distilled for {want} and eta 0 (progressive distillation: each step "
                        f"replaces {made_for['teacher_steps'] // made_for['steps']} of its teacher's); {asked} uses it "
                        f"where it was not trained and gives worse images than the teacher would (sample the teacher "
                        f"{made_for['teacher']} for that)")
        elif made_for["method"] == "consistency" and sampler != "consistency":
            return (f"this is a consistency model: it maps noise straight to an image and is sampled with "
                    f"--sampler consistency (1 step, or a few on --sigmas); {sampler} treats it as a denoiser it is "
                    "not")
        if guidance_scale not in (None, 1.0) and made_for.get("guidance_scale") is not None:
            return (f"guidance (scale {made_for['guidance_scale']:g}) is folded into this distilled model; guiding it "
                    f"again with scale {guidance_scale:g} applies guidance twice (use 1)")
        return None

    def to(self, device: torch.device | str) -> Model:
        self.denoiser.to(device)
        self.encoder.to(device)
        if isinstance(self.conditioner, TextConditioner):
            self.conditioner.to(device)
        return self


@dataclass
class TrainedAutoencoder:
    """An autoencoder ready to be a latent model's encoder: a ``difflab train-vae`` checkpoint or Stable
    Diffusion's VAE (a diffusers ``AutoencoderKL`` folder), with the per-channel latent statistics to whiten with
    (None when a checkpoint has none yet: only the final one of a run records them)."""

    autoencoder: Autoencoder
    mean: list[float] | None
    std: list[float] | None
    source: str                      # where it came from (a checkpoint folder, a diffusers folder or hub id)
    image_size: int | None           # the image size it was trained on (None: not recorded, e.g. diffusers)
    config: dict | None = None       # the train-vae checkpoint's config

    def to(self, device) -> TrainedAutoencoder:
        self.autoencoder.to(device).eval()
        return self

    def encoder(self, mean: list[float] | None = None, std: list[float] | None = None) -> LatentEncoder:
        """The :class:`~difflab.encoders.LatentEncoder` of a latent model (its own statistics unless given)."""
        mean, std = mean or self.mean, std or self.std
        if mean is None or std is None:
            raise DifflabError(f"the autoencoder {self.source} has no latent statistics")
        return LatentEncoder(self.autoencoder, mean, std, self.source)


def load_autoencoder(path: str | Path, *, device: str | torch.device = "auto") -> TrainedAutoencoder:
    """The autoencoder of ``difflab train --vae``: a train-vae run or checkpoint folder (EMA weights), or a diffusers
    ``AutoencoderKL`` folder (or a pipeline folder with ``vae/``, or a hub id when online) -- Stable Diffusion's
    VAE, whose statistics come from its own ``scaling_factor`` and ``shift_factor`` (mean = shift, std = 1/scale)."""
    from difflab import vae_io  # diffusers folders are read without diffusers; only this module knows them

    if vae_io.is_diffusers_autoencoder(path) or not Path(path).exists():
        loaded = vae_io.load_diffusers_autoencoder(path, device=resolve_device(device))
        c = loaded.autoencoder.config.latent_channels
        return TrainedAutoencoder(loaded.autoencoder, [loaded.shift_factor] * c, [1.0 / loaded.scaling_factor] * c,
                                  loaded.source, None)
    loaded = load(path, device=device)
    if not isinstance(loaded, TrainedAutoencoder):
        kind = "diffusion model" if isinstance(loaded, Model) else "noise-aware classifier"
        raise DifflabError(f"--vae '{path}' is a {kind}, not an autoencoder (train one with difflab train-vae, or "
                           "give a diffusers AutoencoderKL folder)")
    return loaded


class NoisyClassifier(nn.Module):
    """``clf(x, sigma) -> logits (N, K)`` of p(y | x, sigma) for x = x0 + sigma * noise (sigma coordinates), for
    classifier guidance (:func:`difflab.guidance.classifier_guidance`).

    The network sees what its parameterization prescribes, as a denoiser's does: c_in(sigma) x and c_noise(sigma)
    (for the VP schedule it was trained on: x_t = x / sqrt(1 + sigma^2) and the timestep of sigma)."""

    def __init__(self, net: UNetClassifier, parameterization: Parameterization, class_names: list[str]):
        super().__init__()
        self.net, self.parameterization, self.class_names = net, parameterization, list(class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c = self.net.config
        return (c.in_channels, c.image_size, c.image_size)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma_per_example(sigma, x)  # (N,)
        _, _, c_in = self.parameterization.scalings(sigma)
        return self.net(append_dims(c_in, x.ndim) * x, self.parameterization.c_noise(sigma)).float()  # (N, K)


def model_config(unet: UNetConfig, *, parameterization: Parameterization, data: dict,
                 encoder: PixelEncoder | LatentEncoder | None = None,
                 conditioner: ClassConditioner | TextConditioner | None = None) -> dict:
    """The JSON that rebuilds a diffusion model (config.json of its checkpoints). ``data``: name, channels,
    image_size of the images it generates."""
    return {"format": MODEL_FORMAT, "unet": dataclasses.asdict(unet), "parameterization": parameterization.config(),
            "encoder": (encoder or PixelEncoder()).config(),
            "conditioner": conditioner.config() if conditioner is not None else None, "data": data}


def classifier_config(unet: UNetConfig, *, class_names: list[str], schedule: NoiseSchedule, data: dict) -> dict:
    """The JSON that rebuilds a noise-aware classifier (config.json of its checkpoints): it sees the input of a
    VP model on ``schedule`` (only the schedule matters; it has no prediction target)."""
    return {"format": CLASSIFIER_FORMAT, "unet": dataclasses.asdict(unet), "class_names": list(class_names),
            "parameterization": {"kind": "vp", "schedule": schedule.name, "timesteps": schedule.T}, "data": data}


def upgrade_config(config: dict) -> dict:
    """A config of any difflab version in the current format (``difflab-model-1`` and ``difflab-classifier-1``
    kept the schedule and prediction at the top level and class names under ``data``)."""
    if not isinstance(config, dict):
        raise DifflabError(f"a model config must be a JSON object, got {type(config).__name__}")
    fmt = config.get("format")
    try:
        if fmt == "difflab-model-1":
            unet, data = config["unet"], dict(config["data"])
            names = data.pop("class_names", None)
            if unet.get("num_classes") is not None and names is None:
                names = [str(i) for i in range(unet["num_classes"])]
            conditioner = ({"kind": "class", "class_names": names, "dropout": config.get("label_dropout", 0.1)}
                           if unet.get("num_classes") is not None else None)
            return {"format": MODEL_FORMAT, "unet": unet, "encoder": {"kind": "pixels"}, "conditioner": conditioner,
                    "parameterization": {"kind": "vp", "prediction": config["prediction"],
                                         "schedule": config["schedule"]["name"],
                                         "timesteps": config["schedule"]["timesteps"]}, "data": data}
        if fmt == "difflab-classifier-1":
            return {"format": CLASSIFIER_FORMAT, "unet": config["encoder"], "class_names": config["class_names"],
                    "parameterization": {"kind": "vp", "schedule": config["schedule"]["name"],
                                         "timesteps": config["schedule"]["timesteps"]}, "data": config["data"]}
    except (KeyError, TypeError, AttributeError) as e:
        raise DifflabError(f"model config of format {fmt} is incomplete: {e}") from None
    return config


def build(config: dict) -> Model | NoisyClassifier | TrainedAutoencoder:
    """A freshly initialised model of the kind ``config['format']`` names (weights from :func:`load`)."""
    config = upgrade_config(config)
    fmt = config.get("format")
    if fmt not in (MODEL_FORMAT, CLASSIFIER_FORMAT, VAE_FORMAT):
        raise DifflabError(f"not a difflab model config (format {fmt!r}, expected {MODEL_FORMAT!r}, "
                           f"{CLASSIFIER_FORMAT!r} or {VAE_FORMAT!r})")
    try:
        if fmt == VAE_FORMAT:
            stats = config.get("latent_stats") or {}
            return TrainedAutoencoder(Autoencoder(AutoencoderConfig(**config["autoencoder"])), stats.get("mean"),
                                      stats.get("std"), "", config["data"].get("image_size"), config)
        unet = UNetConfig(**config["unet"])
        parameterization = parameterization_from_config(config["parameterization"])
        if fmt == CLASSIFIER_FORMAT:
            net = UNetClassifier(unet, len(config["class_names"]))
            return NoisyClassifier(net, parameterization, config["class_names"])
        denoiser = Denoiser(UNet(unet), parameterization)
        return Model(denoiser, encoder_from_config(config.get("encoder")),
                     conditioner_from_config(config.get("conditioner"), denoiser.net), config)
    except (KeyError, TypeError, AttributeError) as e:
        raise DifflabError(f"model config is incomplete or has unknown fields: {e}") from None


def load(path: str | Path, *, weights: str = "ema", device: str | torch.device = "auto"
         ) -> Model | NoisyClassifier | TrainedAutoencoder:
    """Load a run folder (its newest checkpoint) or a checkpoint folder, of any kind; EMA weights by default.

    In a run folder a damaged newest checkpoint gives way to the next older one, with a warning -- as does one
    that a run still training there prunes while it is read (the folder is listed again then).

    Also loaded: a single ``.safetensors`` file of ``difflab export --format safetensors``, and a diffusers pipeline
    folder or hub id (``DDPMPipeline``, Stable Diffusion; :mod:`difflab.diffusers_io`, the ``[diffusers]`` extra)."""
    from difflab import diffusers_io
    from difflab.model_file import is_model_file, load_model_file

    if is_model_file(path):
        return load_model_file(path, weights=weights, device=device)
    if is_foreign_model(path):
        if weights != "ema":
            raise DifflabError("a diffusers folder holds one set of weights: leave --weights at ema")
        return diffusers_io.load_pipeline(str(path), device=resolve_device(device))
    path = Path(path)
    if not path.is_dir() or all((path / f).is_file() for f in REQUIRED_FILES):
        return _load_checkpoint(resolve_checkpoint(path), weights, device)
    tried, problems = set(), []
    for _ in range(10):  # a run that trains writes new checkpoints and prunes old ones while we look
        fresh = [c for c in reversed(checkpoint_folders(path)) if c not in tried]
        for checkpoint in fresh:
            tried.add(checkpoint)
            problem = checkpoint_problem(checkpoint, training_state=False)  # damaged: a truncated file, bad JSON
            if problem is None:
                try:
                    loaded = _load_checkpoint(checkpoint, weights, device)
                except (DifflabError, OSError):
                    if checkpoint.is_dir():  # not damage but a mistake (weights that do not fit): say it at once
                        raise
                    problem = "pruned while it was read"
            if problem is not None:
                problems.append(f"{checkpoint.name}: {problem if checkpoint.is_dir() else 'pruned while it was read'}")
                continue
            if problems:
                print(f"warning: {path}: skipped the newest checkpoint(s), unusable ({'; '.join(problems)}); "
                      f"loaded {checkpoint}", file=sys.stderr)
            return loaded
        if not fresh:
            break
    if not problems:
        resolve_checkpoint(path)  # says what the folder holds instead
    raise DifflabError(f"no usable checkpoint in '{path}': {'; '.join(problems)}")


def is_foreign_model(path: str | Path) -> bool:
    """Whether ``path`` names a model that is not a difflab run: a single-file model, a diffusers pipeline folder, or
    a Hub id (:func:`difflab.hub.is_hub_id`)."""
    from difflab import diffusers_io, hub
    from difflab.model_file import is_model_file

    return is_model_file(path) or diffusers_io.is_pipeline_folder(path) or hub.is_hub_id(path)


def _load_checkpoint(checkpoint: Path, weights: str, device) -> Model | NoisyClassifier | TrainedAutoencoder:
    config, tensors, extra = read_model_files(checkpoint, weights, extra=(LatentEncoder.weights_name,))
    loaded = build(config)
    if isinstance(loaded, TrainedAutoencoder):  # train-vae checkpoints hold autoencoder.* (and discriminator.*)
        prefix = "autoencoder."
        load_state(loaded.autoencoder, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                   checkpoint)
        loaded.source = str(checkpoint)
        return loaded.to(resolve_device(device))
    if isinstance(loaded, Model) and isinstance(loaded.encoder, LatentEncoder):
        if LatentEncoder.weights_name not in extra:
            raise DifflabError(f"checkpoint {checkpoint} is a latent model but holds no {LatentEncoder.weights_name}"
                               ".safetensors (its autoencoder)")
        load_state(loaded.encoder.autoencoder, extra[LatentEncoder.weights_name], checkpoint)
    net = loaded.denoiser.net if isinstance(loaded, Model) else loaded.net
    load_state(net, tensors, checkpoint)
    if isinstance(loaded, Model):
        loaded.checkpoint = checkpoint
        loaded.denoiser.eval()
        return loaded.to(resolve_device(device))
    return loaded.to(resolve_device(device)).eval()


def load_model(path: str | Path, *, weights: str = "ema", device: str | torch.device = "auto") -> Model:
    """:func:`load`, for a diffusion model (a one-line error for anything else)."""
    model = load(path, weights=weights, device=device)
    if not isinstance(model, Model):
        kind = "an autoencoder (difflab train-vae)" if isinstance(model, TrainedAutoencoder) else "a noise-aware classifier"
        raise DifflabError(f"'{path}' is {kind}, not a diffusion model")
    return model


def load_classifier(path: str | Path, *, weights: str = "ema", device: str | torch.device = "auto") -> NoisyClassifier:
    """:func:`load`, for a noise-aware classifier (``difflab train-classifier``)."""
    classifier = load(path, weights=weights, device=device)
    if not isinstance(classifier, NoisyClassifier):
        raise DifflabError(f"'{path}' is not a noise-aware classifier (train one with: difflab train-classifier)")
    return classifier
