"""Encoders: the map between pixels and the space a diffusion model works in (EDM2's ``training/encoders.py``).

A pixel-space model works on the images themselves; a latent model (tutorial §5.3, Rombach et al. 2022) on the
latents of an autoencoder. Training encodes images, sampling decodes what the sampler produced:

    x0 = encoder.encode(images_uint8)         # (N, C, H, W) uint8 -> the model's space, float32
    images = encoder.decode(x)                # the model's space -> pixels in [-1, 1]

Only pixel space is meaningful to clip (a latent has no fixed range), so :attr:`pixel_space` tells
:func:`difflab.generate.generate` whether to clamp the x0 estimate.

The latent rule (one rule for every autoencoder). The diffusion model sees whitened latents, per channel c:

    x = (z - mean_c) / std_c,        z = mean_c + std_c * x        (EDM2, Karras et al. 2024, Sec. 5)

where z ~ q(z | image) is a posterior draw and mean_c, std_c are the statistics of z over the autoencoder's
training set (:func:`latent_statistics`, stored with the autoencoder). Stable Diffusion's single scaling factor s
and shift b (``z_model = (z - b) * s``) are the same rule with mean_c = b and std_c = 1 / s for every channel:
those values come from the diffusers folder's own config, never from a constant.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from difflab.data import cache_dir, to_model_range
from difflab.data.download import save_cache_tensors
from difflab.errors import DifflabError
from difflab.nn.vae import Autoencoder, AutoencoderConfig, DiagonalGaussian


class PixelEncoder(nn.Module):
    """The identity encoder of pixel-space models: uint8 pixels -> floats in [-1, 1] (``x / 127.5 - 1``) and back."""

    kind = "pixels"
    pixel_space = True

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return to_model_range(images)  # (N, C, H, W) float32 in [-1, 1]

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def model_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """The shape (C, H, W) the diffusion model works on for images of ``image_shape``."""
        return tuple(image_shape)

    def config(self) -> dict:
        return {"kind": self.kind}


class LatentEncoder(nn.Module):
    """A frozen autoencoder with its per-channel latent statistics: pixels <-> whitened latents (module doc).

    ``source`` says where the autoencoder came from (a difflab run, a diffusers folder); it is recorded in the
    model config, while the weights travel in every checkpoint of the latent model (``vae.safetensors``)."""

    kind = "vae"
    pixel_space = False
    weights_name = "vae"  # the checkpoint file that holds the autoencoder: vae.safetensors

    def __init__(self, autoencoder: Autoencoder, mean: list[float], std: list[float], source: str = ""):
        super().__init__()
        c = autoencoder.config.latent_channels
        if (len(mean) != c or len(std) != c or not all(math.isfinite(v) and v > 0 for v in std)
                or not all(math.isfinite(v) for v in mean)):
            raise DifflabError(f"latent statistics must give {c} means and {c} positive stds, got {mean} / {std}")
        self.autoencoder = autoencoder.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1))
        self.source = source

    @classmethod
    def raw(cls, autoencoder: Autoencoder, source: str = "") -> LatentEncoder:
        """The encoder whose model space is the raw latent z (mean 0, std 1 for every channel): for encoding the
        cache and measuring the statistics, before they are known."""
        c = autoencoder.config.latent_channels
        return cls(autoencoder, [0.0] * c, [1.0] * c, source)

    def train(self, mode: bool = True) -> LatentEncoder:
        return super().train(False)  # frozen: never in training mode (no dropout)

    @torch.no_grad()
    def posterior(self, images: torch.Tensor) -> DiagonalGaussian:
        """q(z | image) of uint8 images (N, C, H, W), computed in float32: autocast is off, because the posterior
        of a well-trained VAE is narrow and bf16's 8-bit mantissa could round its mean by more than its std; the
        cache is made once, and on a GPU the float32 convolutions run on TF32 tensor cores anyway."""
        with torch.autocast(images.device.type, enabled=False):
            return self.autoencoder.encode(to_model_range(images))

    def whiten(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean) / self.std  # (N, c, h, w) latents -> the model's space

    def unwhiten(self, x: torch.Tensor) -> torch.Tensor:
        return self.mean + self.std * x

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> the model's space: the whitened posterior mean (deterministic; training draws samples)."""
        return self.whiten(self.posterior(images).mean)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The model's space -> pixels in [-1, 1] (unclamped), decoded in float32: half-precision decoders
        overflow to NaN or black images (SD's VAE is known for it), so autocast is turned off here."""
        with torch.autocast(x.device.type, enabled=False):
            return self.autoencoder.decode(self.unwhiten(x.float()))

    def model_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        channels, size = image_shape[0], image_shape[1]
        if channels != self.autoencoder.config.in_channels:
            raise DifflabError(f"the autoencoder takes {self.autoencoder.config.in_channels}-channel images, the "
                               f"data has {channels} (set --channels {self.autoencoder.config.in_channels})")
        return self.autoencoder.config.latent_shape(size)

    def config(self) -> dict:
        return {"kind": self.kind, "autoencoder": dataclasses.asdict(self.autoencoder.config),
                "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist(), "source": self.source}


def encoder_from_config(config: dict | None) -> PixelEncoder | LatentEncoder:
    """Rebuild the encoder a model config describes (None: pixels, as in configs written before encoders). A
    latent encoder comes back with freshly initialised autoencoder weights: :func:`difflab.models.load` puts the
    checkpoint's ``vae.safetensors`` into it."""
    if config is None or config.get("kind") == PixelEncoder.kind:
        return PixelEncoder()
    if config.get("kind") == LatentEncoder.kind:
        try:
            autoencoder = Autoencoder(AutoencoderConfig(**config["autoencoder"]))
            return LatentEncoder(autoencoder, config["mean"], config["std"], config.get("source", ""))
        except (KeyError, TypeError) as e:
            raise DifflabError(f"the model config's autoencoder is incomplete or has unknown fields: {e}") from None
    raise DifflabError(f"unknown encoder kind {config.get('kind')!r} in the model config")


# --- latent statistics and the latent cache ------------------------------------------------------------------------

def moments_statistics(mean: torch.Tensor, std: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of z ~ N(mean, std^2) over a set of posteriors (N, c, h, w), in closed form (law of
    total variance): E[z] = E[mean], Var[z] = Var[mean] + E[std^2] -- what a diffusion model trained on posterior
    draws sees, without drawing."""
    m, s = mean.double(), std.double()
    mu = m.mean(dim=(0, 2, 3))
    var = m.var(dim=(0, 2, 3), unbiased=False) + s.square().mean(dim=(0, 2, 3))
    return mu.tolist(), var.clamp_min(1e-12).sqrt().tolist()


@torch.no_grad()
def encode_moments(encoder: LatentEncoder, images: torch.Tensor, *, batch_size: int = 256, progress: bool = False,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and stds (float32, on the CPU) of uint8 ``images``, in batches on ``device``."""
    means, stds = [], []
    for start in tqdm(range(0, len(images), batch_size), desc="encoding latents", unit="batch", disable=not progress,
                      dynamic_ncols=True):
        q = encoder.posterior(images[start:start + batch_size].to(device))
        means.append(q.mean.float().cpu())
        stds.append(q.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def images_identity(images: torch.Tensor) -> str:
    """A digest of a dataset's uint8 pixels and shape: the latent cache is rebuilt when the data changes."""
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(images.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def module_identity(module: nn.Module, config: dict) -> str:
    """A digest of a module's config and weights."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def latent_cache(encoder: LatentEncoder, images: torch.Tensor, *, data_name: str, hflip: bool,
                 folder: Path | None = None, device: torch.device | str = "cpu", progress: bool = False,
                 batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and stds of every training image, encoded once and kept in
    ``$DIFFLAB_CACHE/latents/`` (safetensors) for the next run. With ``hflip`` the mirrored images follow as a
    second copy (rows N..2N-1). The file is keyed by the autoencoder's and the dataset's identity: a cache whose
    autoencoder or images changed is rebuilt (and said so), never reused."""
    folder = Path(folder) if folder is not None else cache_dir() / "latents"
    vae_id = module_identity(encoder.autoencoder, dataclasses.asdict(encoder.autoencoder.config))
    data_id = images_identity(images)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{Path(data_name).name}-{images.shape[-1]}px-"
                                          f"{'hflip-' if hflip else ''}{encoder.source or 'vae'}")[-120:]
    path = folder / f"{name}.safetensors"
    identity = {"vae": vae_id, "data": data_id, "hflip": str(hflip)}
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                stored = f.metadata() or {}
                if all(stored.get(k) == v for k, v in identity.items()):
                    return f.get_tensor("mean"), f.get_tensor("std")
            changed = [k for k in ("vae", "data") if stored.get(k) != identity[k]]
            print(f"latent cache {path}: the {' and the '.join(changed) or 'file'} changed since it was made; "
                  "rebuilding it")
        except Exception as e:  # a damaged cache file is rebuilt, never trusted
            print(f"latent cache {path} is unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                  "rebuilding it")
    source = torch.cat([images, images.flip(-1)]) if hflip else images
    mean, std = encode_moments(encoder, source, batch_size=batch_size, progress=progress, device=device)
    try:
        save_cache_tensors(path, {"mean": mean, "std": std}, metadata=identity)
    except OSError as e:  # the cache is an optimisation: training goes on without it
        print(f"warning: could not write the latent cache {path} ({e.strerror}); it is encoded again next time")
    return mean, std
