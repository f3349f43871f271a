"""Autoencoder training for latent diffusion (tutorial §5.3; Rombach et al. 2022, LDM App. G), behind
``difflab train-vae``.

Each step encodes a batch into the diagonal Gaussian posterior q(z|x), draws z = mean + std * eps (the
reparameterisation, Kingma & Welling 2014 eq. 10), decodes it, and minimises (LDM's ``LPIPSWithDiscriminator``
without the perceptual term, which would need downloaded weights)

    L = |x - D(z)|_1  (or squared)  +  kl_weight * KL(q(z|x) || N(0, I))  [+  lambda * L_G  +  L_D]

where KL = 0.5 sum(mean^2 + var - 1 - log var) (Kingma & Welling App. B) and, with ``--gan``, a PatchGAN
discriminator (Isola et al. 2017) learns with the hinge loss L_D from the first step, and from ``--gan-start`` on
the generator term L_G = -E[D(x_rec)] pushes the autoencoder, weighted by LDM's adaptive rule lambda = ||grad_last L_rec|| / (||grad_last L_G|| + 1e-4)
(gradients at the decoder's last layer) times ``--gan-weight``. Both networks are one module trained by the loop's
one optimizer: the discriminator sees detached reconstructions in L_D and, in L_G, is called with detached
weights, so each loss moves only its own network.

At the end the per-channel mean and std of the latents over the training set are measured
(:func:`difflab.encoders.moments_statistics`) and stored in the final checkpoint's config: the statistics a latent
diffusion model whitens with.

    difflab train-vae --dataset fashion-mnist --image-size 32 --steps 3000
    difflab train --vae runs/fashion-mnist-vae --dataset fashion-mnist --image-size 32
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from difflab.data import to_model_range
from difflab.encoders import LatentEncoder, encode_moments, moments_statistics
from difflab.errors import DifflabError
from difflab.metrics.reconstruction import psnr, ssim
from difflab.models import VAE_FORMAT
from difflab.nn.discriminator import (
    DiscriminatorConfig,
    PatchDiscriminator,
    adaptive_gan_weight,
    hinge_d_loss,
    hinge_g_loss,
)
from difflab.nn.vae import VAE_PRESETS, Autoencoder, autoencoder_config
from difflab.tasks.images import load_training_images
from difflab.training.config import setting
from difflab.training.runs import batch_indices, random_hflip
from difflab.training.task import Task
from difflab.viz import save_grid

RECONSTRUCTION_LOSSES = ("l1", "l2")


@dataclass
class VAEConfig:
    """The settings of autoencoder training besides the shared ones."""

    preset: str = setting("tiny", f"autoencoder size preset: {', '.join(VAE_PRESETS)} (tiny: f = 4, 1.7 M "
                                  "parameters; sd: Stable Diffusion's f = 8, 4 latent channels)", frozen=True)
    model: dict = setting(dict, "autoencoder config overrides, e.g. {latent_channels: 4, block_channels: [32, 64, 64]} "
                                "(config file only)", frozen=True)
    reconstruction: str = setting("l1", "reconstruction loss: l1 (LDM) or l2")
    kl_weight: float = setting(1e-6, "weight of the KL term (LDM: 1e-6; larger gives smoother, blurrier latents)")
    gan: bool = setting(False, "train a PatchGAN discriminator too (hinge loss, LDM's adaptive weight)", frozen=True)
    gan_start: int = setting(2000, "gan: the step from which the discriminator's loss pushes the autoencoder (it "
                                   "learns from the first step; LDM: start once the autoencoder reconstructs well)")
    gan_weight: float = setting(0.5, "gan: factor on LDM's adaptive weight of the generator loss")
    num_samples: int = setting(16, "originals shown next to their reconstructions")
    stats_images: int = setting(4096, "training images whose latents give the per-channel mean and std (0 = all)")


class VAEBatch(NamedTuple):
    x: torch.Tensor         # images in [-1, 1] (n, C, H, W)
    eps: torch.Tensor       # the reparameterisation noise, like the latents (n, c, h, w)
    step: int               # the global step (the adversarial term starts at --gan-start)


class AutoencoderWithDiscriminator(nn.Module):
    """What ``train-vae`` optimises: the autoencoder and, with ``--gan``, its discriminator, as one module (one
    optimizer, one EMA, one DDP wrapper). Checkpoints hold ``autoencoder.*`` and ``discriminator.*`` tensors."""

    def __init__(self, autoencoder: Autoencoder, discriminator: PatchDiscriminator | None):
        super().__init__()
        self.autoencoder, self.discriminator = autoencoder, discriminator

    def forward(self, x: torch.Tensor, eps: torch.Tensor, with_gan: bool = False):
        posterior = self.autoencoder.encode(x)
        z = posterior.mean + posterior.std * eps  # reparameterisation (Kingma & Welling eq. 10)
        recon = self.autoencoder.decode(z)  # (n, C, H, W)
        if not with_gan:
            return recon, posterior, None
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        logits_g = torch.func.functional_call(self.discriminator, frozen, (recon,))  # moves the autoencoder only
        logits_real = self.discriminator(x)
        logits_fake = self.discriminator(recon.detach())  # moves the discriminator only
        return recon, posterior, (logits_g, logits_real, logits_fake)


def _unwrap(net: nn.Module) -> nn.Module:
    """The module under a DDP wrapper and/or torch.compile."""
    net = getattr(net, "_orig_mod", net)
    return getattr(net, "module", net)


class VAETask(Task):
    """Train a KL autoencoder; reconstructions next to originals are its progress picture."""

    name, noun, command = "vae", "autoencoder", "difflab train-vae"
    config_class = VAEConfig
    run_defaults = {"lr": 1e-3, "steps": 2000, "batch_size": 32, "warmup": 100}
    folder_suffix = "-vae"
    summary = "train an autoencoder (VAE) for latent diffusion"
    description = ("Train a KL-regularised autoencoder (LDM's AutoencoderKL; tutorial §5.3) whose latents a diffusion "
                   "model can then learn (difflab train --vae RUN). Writes reconstructions.png (originals above "
                   "their reconstructions), loss.png and checkpoints; the final checkpoint records the latents' "
                   "per-channel mean and std.")
    examples = """examples:
  difflab train-vae --dataset fashion-mnist --image-size 32          # tiny preset, f = 4: 32x32x1 -> 8x8x4
  difflab train-vae --dataset fashion-mnist --image-size 32 --preset tiny-f2
  difflab train-vae --dataset ./my_photos --image-size 64 --preset small --gan --gan-start 20000
  difflab train --vae runs/fashion-mnist-vae --dataset fashion-mnist --image-size 32   # latent diffusion
  difflab eval-vae runs/fashion-mnist-vae --real fashion-mnist        # PSNR, SSIM, rFID on the test split"""
    report = ("reconstructions: {run}/reconstructions.png, loss plot: {run}/loss.png\n"
              "train a latent diffusion model on it with: difflab train --vae {run_arg} (same --dataset and "
              "--image-size)")

    @classmethod
    def check(cls, run, cfg: VAEConfig) -> None:
        if cfg.reconstruction not in RECONSTRUCTION_LOSSES:
            raise DifflabError(f"--reconstruction must be l1 or l2, got '{cfg.reconstruction}'")
        for name in ("kl_weight", "gan_weight"):
            if not (getattr(cfg, name) >= 0 and getattr(cfg, name) < float("inf")):
                raise DifflabError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {getattr(cfg, name)}")
        for name in ("gan_start", "stats_images"):
            if getattr(cfg, name) < 0:
                raise DifflabError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(cfg, name)}")
        if cfg.num_samples < 1:
            raise DifflabError(f"--num-samples must be at least 1, got {cfg.num_samples}")
        config = autoencoder_config(cfg.preset, **{"in_channels": run.channels or 1, **cfg.model})  # bad preset/field
        if config.out_channels not in (None, config.in_channels):
            raise DifflabError(f"model.out_channels must equal the image channels for train-vae, got "
                               f"{config.out_channels}")
        if run.image_size is not None:
            config.latent_shape(run.image_size)  # an image size the autoencoder cannot take

    def setup(self) -> nn.Module:
        cfg, ctx = self.config, self.ctx
        data, self.run = load_training_images(self.run, ctx)
        self.data_name, self.image_shape = data.name, tuple(data.images.shape[1:])
        self.images = data.images.to(ctx.device)
        channels, size = self.image_shape[0], self.image_shape[1]
        self.autoencoder_config = autoencoder_config(cfg.preset, **{"in_channels": channels, **cfg.model})
        if self.autoencoder_config.in_channels != channels:
            raise DifflabError(f"model.in_channels {self.autoencoder_config.in_channels} does not match the data's "
                               f"{channels} channels")
        self.latent_shape = self.autoencoder_config.latent_shape(size)
        # the PatchGAN's depth: LDM's 3 layers where the image allows (70x70 patches), fewer for small images
        layers = max(1, min(3, int(math.log2(size / 3))))
        self.discriminator_config = DiscriminatorConfig(in_channels=channels, layers=layers) if cfg.gan else None
        net = AutoencoderWithDiscriminator(Autoencoder(self.autoencoder_config),
                                           PatchDiscriminator(self.discriminator_config) if cfg.gan else None)
        # a fixed set of training images to show and to score (eval_*: PSNR, SSIM)
        self.shown = self.images[torch.randperm(len(self.images), generator=torch.Generator().manual_seed(0))
                                 [: cfg.num_samples].to(ctx.device)]
        self.latent_stats = None
        self.shard = ctx.shard(self.run.batch_size)
        return net.to(ctx.device)

    def batch(self, step: int, generator: torch.Generator) -> VAEBatch:
        run, device = self.run, self.ctx.device
        idx = batch_indices(step, run.batch_size, len(self.images), run.seed, device)
        x = to_model_range(self.images[idx])
        if run.hflip:
            x = random_hflip(x, generator)
        eps = torch.randn((x.shape[0], *self.latent_shape), generator=generator, device=device)
        return VAEBatch(x[self.shard], eps[self.shard], step)

    def loss(self, net, b: VAEBatch):
        cfg = self.config
        with_gan = cfg.gan  # from the start: the discriminator learns, and DDP needs every weight used
        recon, posterior, logits = net(b.x, b.eps, with_gan)
        diff = (recon.float() - b.x).abs() if cfg.reconstruction == "l1" else (recon.float() - b.x).square()
        rec = diff.mean(dim=(1, 2, 3))  # (n,) per-pixel mean, so the KL weight means what LDM's does per pixel
        kl = posterior.kl().float() / b.x[0].numel()  # (n,) per pixel too
        loss = rec + cfg.kl_weight * kl
        metrics = {"rec": rec.detach(), "kl": kl.detach()}
        if logits is not None:
            logits_g, logits_real, logits_fake = logits
            g, d = hinge_g_loss(logits_g), hinge_d_loss(logits_real, logits_fake)  # (n,) each
            # the discriminator learns from the first step (so its Adam moments are warm when it starts to matter);
            # the autoencoder is pushed by it from --gan-start on (LDM starts both there)
            on = float(b.step >= cfg.gan_start)
            weight = (adaptive_gan_weight(rec.mean(), g.mean(), _unwrap(net).autoencoder.last_layer) * cfg.gan_weight
                      if on else torch.zeros((), device=rec.device))
            loss = loss + on * weight * g + d
            metrics.update(g=g.detach(), d=d.detach(), gan_weight=weight.detach().expand_as(rec))
        return loss, metrics

    def model_config(self) -> dict:
        return {"format": VAE_FORMAT, "autoencoder": dataclasses.asdict(self.autoencoder_config),
                "discriminator": dataclasses.asdict(self.discriminator_config) if self.discriminator_config else None,
                "latent_stats": self.latent_stats,
                "data": {"name": self.data_name, "channels": self.image_shape[0], "image_size": self.image_shape[1]}}

    @torch.no_grad()
    def reconstruct(self, ema: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Reconstructions (posterior means decoded, in float32 like difflab eval-vae) of uint8 images, in [-1, 1]."""
        encoder = LatentEncoder.raw(ema.autoencoder)
        return encoder.decode(encoder.posterior(images).mean).clamp(-1, 1)

    def show(self, step: int, ema) -> None:
        """Originals above their reconstructions: reconstructions/step_N.png and reconstructions.png."""
        recon = self.reconstruct(ema, self.shown)
        grid = torch.cat([to_model_range(self.shown), recon])
        run_dir, nrow = self.ctx.run_dir, len(self.shown)

        def draw() -> None:
            save_grid(grid, run_dir / "reconstructions" / f"step_{step:07d}.png", nrow=nrow)
            save_grid(grid, run_dir / "reconstructions.png", nrow=nrow)

        self.ctx.on_main("drawing the reconstructions", draw)

    def evaluate(self, step: int, ema) -> dict[str, float]:
        """PSNR and SSIM of the shown images' reconstructions (dB; SSIM in [-1, 1])."""
        x, recon = to_model_range(self.shown), self.reconstruct(ema, self.shown)
        return {"psnr": float(psnr(recon, x).mean()), "ssim": float(ssim(recon, x).mean())}

    def before_final_checkpoint(self, ema) -> None:
        """The latents' per-channel mean and std over (up to ``stats_images``) training images, for whitening."""
        n = self.config.stats_images or len(self.images)
        pick = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(1))[:n].to(self.ctx.device)
        encoder = LatentEncoder.raw(ema.autoencoder)
        mean, std = encode_moments(encoder, self.images[pick], device=self.ctx.device, progress=self.ctx.progress)
        channel_mean, channel_std = moments_statistics(mean, std)
        self.latent_stats = {"mean": channel_mean, "std": channel_std, "images": int(len(pick))}
        if self.ctx.main:
            print(f"latent statistics over {len(pick)} training images: mean "
                  f"{[round(v, 4) for v in channel_mean]}, std {[round(v, 4) for v in channel_std]}")


def train_vae(config: dict | None = None, *, resume=None, overwrite: bool = False, progress: bool = True,
              **overrides):
    """Train an autoencoder (``difflab train-vae``) and return its run folder; arguments as in
    :func:`difflab.train`."""
    from difflab.training import loop

    return loop.train(VAETask, config, resume=resume, overwrite=overwrite, progress=progress, **overrides)
