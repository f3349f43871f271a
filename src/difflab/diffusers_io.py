"""Diffusers pipeline folders as difflab models: every difflab sampler, guidance wrapper and metric on them.

    model = difflab.load("google/ddpm-cifar10-32")          # a hub id (online) or a local pipeline folder
    images = difflab.sample(model, 16, sampler="dpmpp_3m", steps=20)
    sd = difflab.load("path/to/stable-diffusion-v1-5")      # StableDiffusionPipeline layout: a latent text model
    images = difflab.sample(sd, 4, prompts=["a photo of a cat"] * 4, guidance_scale=7.5)

Two layouts (the ``_class_name`` of ``model_index.json``):

* **UNet2DModel pipelines** (``DDPMPipeline``, ``DDIMPipeline``): ``unet/`` + ``scheduler/``. The U-Net predicts eps,
  x0 or v (the scheduler's ``prediction_type``) from x_t and the integer DDPM timestep: exactly difflab's VP
  parameterization on the scheduler's betas (c_in = 1 / sqrt(1 + sigma^2), c_noise = the timestep of sigma).
* **Stable Diffusion 1.x / 2.x** (``StableDiffusionPipeline``): ``unet/`` (``UNet2DConditionModel``), ``vae/``
  (``AutoencoderKL``, loaded into difflab's own autoencoder by :mod:`difflab.vae_io`, with the folder's scaling
  factor as the latent statistics), ``text_encoder/`` + ``tokenizer/`` (a frozen Hugging Face encoder, prompts padded
  to the tokenizer's ``model_max_length`` and no padding mask, as SD was trained), ``scheduler/`` (betas and
  prediction type: ``v_prediction`` for SD 2.x 768). The empty prompt is the null condition, as in diffusers.

The diffusers U-Nets themselves run inside :class:`DiffusersUNet`, a network with difflab's call signature
``net(x, c_noise, cond)``; everything around them (parameterization, samplers, guidance, decoding) is difflab's.
This module needs the ``[diffusers]`` extra (``diffusers`` and, for SD, ``transformers``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from difflab import hub
from difflab.conditioning import ClassConditioner, TextConditioner
from difflab.denoisers import Denoiser, VPParameterization
from difflab.errors import DifflabError
from difflab.extras import require
from difflab.schedules import make_schedule

FORMAT = "diffusers"                                  # Model.config["format"] of a model loaded from a diffusers folder
UNET2D_PIPELINES = ("DDPMPipeline", "DDIMPipeline")   # unet/ (UNet2DModel) + scheduler/
TEXT_PIPELINES = ("StableDiffusionPipeline",)         # unet/ vae/ text_encoder/ tokenizer/ scheduler/
DIFFLAB_FILE = "difflab.json"                         # what `difflab export` adds: the difflab model config
PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
# diffusers beta_schedule -> difflab schedule name (same formula; the range comes from beta_start / beta_end)
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "quadratic", "squaredcos_cap_v2": "cosine",
                  "sigmoid": "sigmoid"}


def is_pipeline_folder(path: str | Path) -> bool:
    """Whether ``path`` is a diffusers pipeline folder (it holds ``model_index.json``)."""
    return (Path(path) / "model_index.json").is_file()


def _read_json(file: Path, what: str) -> dict:
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise DifflabError(f"{file.parent} has no {file.name}: {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DifflabError(f"cannot read {file}: {e}") from None
    if not isinstance(data, dict):
        raise DifflabError(f"{file} is not a JSON object")
    return data


def schedule_from_scheduler(config: dict, source: str) -> tuple:
    """(NoiseSchedule, prediction) of a diffusers scheduler config; one line for what difflab cannot reproduce."""
    if config.get("trained_betas") is not None:
        raise DifflabError(f"{source}: the scheduler lists its betas explicitly (trained_betas), which difflab does "
                           "not read; only named beta schedules are supported")
    if config.get("rescale_betas_zero_snr"):
        raise DifflabError(f"{source}: rescale_betas_zero_snr gives the last timestep infinite noise (sigma_max = "
                           "inf), which difflab's sigma-space samplers cannot start from")
    kind = config.get("beta_schedule", "linear")
    if kind not in BETA_SCHEDULES:
        raise DifflabError(f"{source}: unsupported beta_schedule '{kind}' (supported: {', '.join(BETA_SCHEDULES)})")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise DifflabError(f"{source}: unsupported prediction_type '{prediction}' "
                           f"(supported: {', '.join(PREDICTIONS)})")
    name = BETA_SCHEDULES[kind]
    options = {} if name == "cosine" else {"beta_start": float(config.get("beta_start", 0.0001)),
                                           "beta_end": float(config.get("beta_end", 0.02))}
    return make_schedule(name, int(config.get("num_train_timesteps", 1000)), **options), PREDICTIONS[prediction]


def scheduler_config(param: VPParameterization) -> dict:
    """The diffusers ``DDPMScheduler`` config of a VP parameterization (what `difflab export` writes)."""
    schedule, names = param.schedule, {v: k for k, v in BETA_SCHEDULES.items()}
    options = dict(schedule.options)
    if schedule.name == "cosine" and options:
        raise DifflabError("a cosine schedule with non-default options has no diffusers equivalent")
    betas = {} if schedule.name == "cosine" else {"beta_start": options.get("beta_start", 1e-4),
                                                   "beta_end": options.get("beta_end", 0.02)}
    return {"_class_name": "DDPMScheduler", "num_train_timesteps": schedule.T, "beta_schedule": names[schedule.name],
            **betas, "prediction_type": {v: k for k, v in PREDICTIONS.items()}[param.prediction],
            "variance_type": "fixed_small", "clip_sample": True, "clip_sample_range": 1.0,
            "timestep_spacing": "leading",
            "steps_offset": 0}


class DiffusersUNet(nn.Module):
    """A diffusers ``UNet2DModel`` or ``UNet2DConditionModel`` as a difflab network ``net(x, c_noise, cond)``.

    ``c_noise`` is the (possibly fractional) DDPM timestep the VP parameterization gives; ``cond`` is class labels
    (N,) for a class-conditional UNet2DModel (None: the ``null_class`` row, when the model has one) or a text cond
    ``{"tokens": (N, L, D), ...}`` whose tokens become the U-Net's ``encoder_hidden_states``."""

    def __init__(self, unet: nn.Module, null_class: int | None = None):
        super().__init__()
        self.unet, self.null_class = unet, null_class
        self.takes_text = getattr(unet.config, "cross_attention_dim", None) is not None
        self.num_class_embeds = getattr(unet.config, "num_class_embeds", None)
        # a learned-variance model (improved DDPM) outputs [mean target; variance]: difflab's samplers use the first
        # half, as diffusers' schedulers do for the mean
        self.channels = unet.config.in_channels
        if unet.config.out_channels not in (self.channels, 2 * self.channels):
            raise DifflabError(f"a diffusers U-Net with {self.channels} input and {unet.config.out_channels} output "
                               "channels is neither a denoiser nor a learned-variance one")

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond=None) -> torch.Tensor:
        if self.takes_text:
            if not isinstance(cond, Mapping) or "tokens" not in cond:
                raise DifflabError("this diffusers U-Net is text-conditional: it needs a prompt's tokens")
            tokens = cond["tokens"].to(x.dtype)                                    # (N, L, D)
            out = self.unet(x, c_noise, encoder_hidden_states=tokens).sample      # (N, C or 2C, H, W)
            return out[:, :self.channels]
        if isinstance(cond, Mapping):
            raise DifflabError("a text condition was given to a diffusers U-Net without cross-attention")
        if self.num_class_embeds is not None and cond is None:
            if self.null_class is None:
                raise DifflabError("this class-conditional diffusers U-Net has no null class: give a class")
            cond = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
        if self.num_class_embeds is None and cond is not None:
            raise DifflabError("a class was given to an unconditional diffusers U-Net")
        return self.unet(x, c_noise, class_labels=cond).sample[:, :self.channels]  # (N, C, H, W)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".msgpack", ".h5", ".onnx", ".pb", ".pt", ".pth")
COMPONENTS = ("unet", "scheduler", "vae", "text_encoder", "tokenizer")


def hub_files(repo: str, files: list[str]) -> list[str]:
    """What to fetch of a Hub pipeline repository: its ``model_index.json`` first (an unsupported pipeline is refused
    before any weight is downloaded), then the configs, tokenizer files and weights of the components difflab uses
    -- safetensors when the component has them, else its .bin; never fp16 / non-EMA variants, a safety checker or a
    root-level single-file checkpoint (gigabytes nobody reads)."""
    import huggingface_hub

    if "model_index.json" not in files:
        raise DifflabError(f"the Hub repository {repo} is not a diffusers pipeline (no model_index.json)")
    index = _read_json(Path(huggingface_hub.hf_hub_download(repo, "model_index.json")), "")
    _check_pipeline(index.get("_class_name"), repo)
    patterns = ["model_index.json", DIFFLAB_FILE]
    for component in COMPONENTS:
        mine = [f for f in files if f.startswith(component + "/")]
        weights = [f for f in mine if Path(f).suffix in WEIGHT_SUFFIXES and "." not in Path(f).stem]  # no .fp16.
        patterns += [f for f in mine if Path(f).suffix not in WEIGHT_SUFFIXES]  # configs, tokenizer files
        patterns += [f for f in weights if f.endswith(".safetensors")] or [f for f in weights if f.endswith(".bin")]
    return patterns


def _check_pipeline(kind, source: str) -> None:
    if kind not in UNET2D_PIPELINES + TEXT_PIPELINES:
        raise DifflabError(f"{source}: unsupported pipeline class '{kind}' (supported: "
                           f"{', '.join(UNET2D_PIPELINES + TEXT_PIPELINES)})")


def resolve(path_or_hub_id: str | Path) -> Path:
    """A local pipeline folder, or a hub id downloaded into the Hugging Face cache (:func:`hub_files` only)."""
    path, source = Path(path_or_hub_id).expanduser(), str(path_or_hub_id)
    if path.exists():
        if not path.is_dir() or not is_pipeline_folder(path):
            raise DifflabError(f"{source} is not a diffusers pipeline folder (no model_index.json)")
        return path
    if not hub.is_hub_id(source):
        raise DifflabError(f"no such run, checkpoint or diffusers folder: {source}")
    return hub.download(source, allow=lambda files: hub_files(source, files),
                        what="the pipeline repository (model_index.json and its component folders)")


def _load_component(cls, folder: Path, subfolder: str, source: str) -> nn.Module:
    """``cls.from_pretrained(folder/subfolder)`` with every failure one line. diffusers only warns about weights
    it had to initialise, so the loaded state dict is checked against the file's keys here."""
    part = folder / subfolder
    if not (part / "config.json").is_file():
        raise DifflabError(f"{source}: missing {subfolder}/config.json")
    try:
        module, info = cls.from_pretrained(str(part), output_loading_info=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as e:
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
        if "state_dict" in lines[0]:  # torch's "Error(s) in loading state_dict for ...:" then the details
            raise DifflabError(f"{source}: {subfolder}/ weights do not match its config "
                               f"({lines[1] if len(lines) > 1 else lines[0]}"[:300] + ")") from None
        raise DifflabError(f"{source}: cannot load {subfolder}/ ({lines[0][:200]})") from None
    wrong = [*(info.get("missing_keys") or []), *(info.get("mismatched_keys") or []),
             *(info.get("unexpected_keys") or [])]
    if wrong:
        raise DifflabError(f"{source}: {subfolder}/ weights do not match its config ({len(wrong)} missing, "
                           f"mismatched or unexpected, e.g. {wrong[0]})")
    return module.float().eval().requires_grad_(False)


def load_pipeline(path_or_hub_id: str | Path, *, device: torch.device):
    """A diffusers pipeline folder (or hub id) as a :class:`difflab.models.Model` (module doc)."""
    from difflab.encoders import PixelEncoder
    from difflab.models import Model

    source = str(path_or_hub_id)
    folder = resolve(path_or_hub_id)
    diffusers = require("diffusers", extra="diffusers", feature="loading diffusers models")
    index = _read_json(folder / "model_index.json", "not a diffusers pipeline folder")
    kind = index.get("_class_name")
    _check_pipeline(kind, source)
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json", "the pipeline needs its scheduler")
    schedule, prediction = schedule_from_scheduler(scheduler, source)
    param = VPParameterization(schedule, prediction)
    ours = _read_json(folder / DIFFLAB_FILE, "") if (folder / DIFFLAB_FILE).is_file() else {}
    if kind in UNET2D_PIPELINES:
        unet = _load_component(diffusers.UNet2DModel, folder, "unet", source)
        c = unet.config
        conditioner, null_class = None, None
        if c.num_class_embeds is not None:
            recorded = ours.get("conditioner") or {}
            if recorded.get("kind") == "class" and len(recorded.get("class_names", [])) + 1 == c.num_class_embeds:
                conditioner = ClassConditioner(recorded["class_names"], recorded.get("dropout", 0.1))
                null_class = len(recorded["class_names"])  # difflab's null row is the last one
            else:  # a class-conditional model from elsewhere: no null class, so no classifier-free guidance
                conditioner = ClassConditioner([str(i) for i in range(c.num_class_embeds)], 0.0)
        if c.sample_size is None or not isinstance(c.sample_size, int):
            raise DifflabError(f"{source}: unet/config.json needs a square integer sample_size")
        encoder, size, channels = PixelEncoder(), c.sample_size, c.in_channels
        net = DiffusersUNet(unet, null_class)
        data = {"name": (ours.get("data") or {}).get("name", source), "channels": channels, "image_size": size}
    else:
        from difflab.models import load_autoencoder
        from difflab.nn.text import HFTextEncoder

        unet = _load_component(diffusers.UNet2DConditionModel, folder, "unet", source)
        c = unet.config
        if not isinstance(c.sample_size, int):
            raise DifflabError(f"{source}: unet/config.json needs a square integer sample_size")
        trained = load_autoencoder(folder / "vae", device="cpu")
        encoder = trained.encoder()
        tokenizer_config = _read_json(folder / "tokenizer" / "tokenizer_config.json",
                                      "the pipeline needs its tokenizer")
        max_length = int(tokenizer_config.get("model_max_length", 77))
        if max_length > 4096:  # transformers' "no limit" sentinel
            max_length = 77
        text = HFTextEncoder(str((folder / "text_encoder").resolve()), max_length=max_length,
                             tokenizer=str((folder / "tokenizer").resolve()), mask_padding=False)
        if text.width != c.cross_attention_dim:
            raise DifflabError(f"{source}: the text encoder's width {text.width} differs from the U-Net's "
                               f"cross_attention_dim {c.cross_attention_dim}")
        conditioner = TextConditioner(text, 0.1)  # SD dropped 10% of captions: the empty prompt is its null
        net = DiffusersUNet(unet)
        size, channels = c.sample_size, c.in_channels
        vae = trained.autoencoder.config
        if c.in_channels != vae.latent_channels:
            raise DifflabError(f"{source}: the U-Net takes {c.in_channels} channels, the VAE makes "
                               f"{vae.latent_channels}-channel latents")
        data = {"name": source, "channels": vae.in_channels, "image_size": size * vae.downsampling_factor}
    config = {"format": FORMAT, "source": source, "pipeline": kind,
              "unet": {"in_channels": channels, "image_size": size}, "parameterization": param.config(),
              "encoder": encoder.config(), "conditioner": conditioner.config() if conditioner else None, "data": data}
    if kind in TEXT_PIPELINES:
        config["guidance_scale"] = 7.5  # the pipeline's default
    model = Model(Denoiser(net, param), encoder, conditioner, config, checkpoint=folder)
    model.denoiser.eval()
    return model.to(device)
