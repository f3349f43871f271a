"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, §3 and Appendix G), the "VAE" of
Stable Diffusion: it compresses an image by a factor f per side into a small latent on which a diffusion model
is trained, and decodes latents back to pixels.

    x (N, C, H, W) in [-1, 1]
      --conv_in--> [down: layers_per_block x ResBlock, Downsample (not on the last level)] x levels
      --> middle: ResBlock, Attention, ResBlock
      --> GroupNorm, SiLU, conv_out --> quant_conv (1x1) --> moments (N, 2 * latent_channels, H/f, W/f)
      --> DiagonalGaussian q(z | x): mean and log-variance
    z (N, latent_channels, H/f, W/f)
      --post_quant_conv (1x1)--> conv_in --> middle: ResBlock, Attention, ResBlock
      --> [up: (layers_per_block + 1) x ResBlock, Upsample (not on the last level)] x levels (widest first)
      --> GroupNorm, SiLU, conv_out --> (N, out_channels, H, W)

The submodule names are those of diffusers' ``AutoencoderKL`` (``encoder.down_blocks.0.resnets.1.conv2``,
``decoder.mid_block.attentions.0.to_q``, ...), so Stable Diffusion's VAE weights load with
``load_state_dict(strict=True)`` unchanged (:mod:`difflab.vae_io`). The code is difflab's own.

Unlike the diffusion U-Net (``unet.py``) nothing is zero-initialised: PyTorch's default initialisation, as in
LDM. The autoencoder is trained with a reconstruction loss, a small KL weight and a patch GAN
(:mod:`difflab.nn.discriminator`); a decoder that started at zero would give the GAN nothing to look at.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import DifflabError
from difflab.nn.layers import Upsample

NORM_EPS = 1e-6  # LDM's (and diffusers') GroupNorm epsilon throughout the autoencoder


@dataclass(frozen=True)
class AutoencoderConfig:
    """Everything needed to rebuild an :class:`Autoencoder`; round-trips through ``to_dict`` -> JSON ->
    ``from_dict``. Nonsense raises :class:`DifflabError`."""

    in_channels: int = 3                 # image channels in
    out_channels: int | None = None      # image channels out; None means in_channels
    latent_channels: int = 4             # channels of z
    block_channels: list[int] = field(default_factory=lambda: [32, 64, 96])  # one per level; f = 2 ** (len - 1)
    layers_per_block: int = 2            # ResBlocks per level in the encoder (the decoder has one more, like LDM)
    norm_groups: int = 32                # GroupNorm groups; must divide every entry of block_channels
    mid_attention: bool = True           # one-head self-attention between the two middle ResBlocks (LDM)
    quant_conv: bool = True              # the 1x1 convs around the latent (LDM's quant_conv / post_quant_conv)
    logvar_min: float = -30.0            # the posterior's log-variance is clamped to [logvar_min, logvar_max] (LDM)
    logvar_max: float = 20.0
    dropout: float = 0.0                 # dropout inside every ResBlock (LDM trains with 0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_channels", list(self.block_channels))
        _validate(self)

    @property
    def downsampling_factor(self) -> int:
        """How much smaller the latent is than the image, per side: ``f = 2 ** (levels - 1)``."""
        return 2 ** (len(self.block_channels) - 1)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """The shape ``(latent_channels, image_size / f, image_size / f)`` of the latent of a square image."""
        f = self.downsampling_factor
        if image_size % f:
            fit = max(f, round(image_size / f) * f)
            raise DifflabError(f"image size {image_size} is not divisible by the autoencoder's downsampling factor "
                               f"{f}: resize or crop the images to {fit}, or use a preset with a smaller f")
        return (self.latent_channels, image_size // f, image_size // f)

    def to_dict(self) -> dict:
        """Plain JSON-able dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AutoencoderConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`DifflabError`."""
        _check_fields(d)
        return cls(**d)


def _check_fields(d: dict) -> None:
    fields = {f.name for f in dataclasses.fields(AutoencoderConfig)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise DifflabError(f"unknown autoencoder option(s) {', '.join(unknown)} (valid: {', '.join(sorted(fields))})")


def _validate(c: AutoencoderConfig) -> None:
    """Raise a one-line :class:`DifflabError` for a config that cannot build an autoencoder."""
    ints = {"in_channels": c.in_channels, "latent_channels": c.latent_channels,
            "layers_per_block": c.layers_per_block, "norm_groups": c.norm_groups}
    if c.out_channels is not None:
        ints["out_channels"] = c.out_channels
    for name, value in ints.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DifflabError(f"autoencoder {name} must be a positive integer, got {value!r}")
    if not c.block_channels or any(not isinstance(ch, int) or isinstance(ch, bool) or ch < 1
                                   for ch in c.block_channels):
        raise DifflabError(f"autoencoder block_channels must be a non-empty list of positive integers, "
                           f"got {c.block_channels}")
    bad = [ch for ch in c.block_channels if ch % c.norm_groups]
    if bad:
        raise DifflabError(f"autoencoder norm_groups {c.norm_groups} does not divide the channel count(s) {bad}: "
                           f"choose a common divisor of {c.block_channels}")
    if not c.logvar_min < c.logvar_max:
        raise DifflabError(f"autoencoder logvar_min ({c.logvar_min}) must be below logvar_max ({c.logvar_max})")
    if not 0.0 <= c.dropout < 1.0:
        raise DifflabError(f"autoencoder dropout must be in [0, 1), got {c.dropout}")


# Named sizes (parameter counts for 3 image channels and the default 4 latent channels).
VAE_PRESETS: dict[str, dict] = {
    # CPU tests and small datasets (28-64 px): f = 4, 1.7 M parameters.
    "tiny": dict(block_channels=[32, 64, 96], layers_per_block=1, latent_channels=4, norm_groups=16),
    # The same widths with f = 2, for small images whose latent should keep more resolution: 1.4 M.
    "tiny-f2": dict(block_channels=[32, 96], layers_per_block=1, latent_channels=4, norm_groups=16),
    # f = 4, widths doubling like Stable Diffusion's: 13.9 M (CIFAR-sized and larger images on one GPU).
    "small": dict(block_channels=[64, 128, 256], layers_per_block=2, latent_channels=4, norm_groups=32),
    # Stable Diffusion's VAE (LDM's KL-f8), 83.65 M: loads the weights of e.g. stabilityai/sd-vae-ft-mse.
    "sd": dict(block_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_groups=32),
}


def autoencoder_config(preset: str = "tiny", **overrides) -> AutoencoderConfig:
    """The :class:`AutoencoderConfig` of a named preset; ``overrides`` replace any field (e.g. ``in_channels=1``)."""
    if preset not in VAE_PRESETS:
        raise DifflabError(f"unknown autoencoder preset '{preset}' (choose from {', '.join(VAE_PRESETS)})")
    _check_fields(overrides)
    try:
        return AutoencoderConfig(**{**VAE_PRESETS[preset], **overrides})
    except (TypeError, ValueError) as e:  # e.g. block_channels: 64, logvar_min: "low"
        raise DifflabError(f"autoencoder config {overrides}: {e}") from None


class DiagonalGaussian:
    """The posterior q(z | x) = N(mean, diag(exp(logvar))) that the encoder outputs (Kingma & Welling 2014).

    ``moments`` (N, 2C, h, w) hold the mean then the log-variance along dim 1. The log-variance is clamped to
    [logvar_min, logvar_max] as in LDM, so exp() never overflows or underflows to an exact 0."""

    def __init__(self, moments: torch.Tensor, *, logvar_min: float = -30.0, logvar_max: float = 20.0):
        self.mean, logvar = moments.chunk(2, dim=1)  # (N, C, h, w) each
        self.logvar = logvar.clamp(logvar_min, logvar_max)  # (N, C, h, w)
        self.std = torch.exp(0.5 * self.logvar)  # (N, C, h, w)
        self.var = torch.exp(self.logvar)  # (N, C, h, w)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw z = mean + std * eps with eps ~ N(0, I) from ``generator``: the reparameterisation trick
        (Kingma & Welling eq. 10), so gradients flow to the mean and the log-variance."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps  # (N, C, h, w)

    def mode(self) -> torch.Tensor:
        """The most likely latent, the mean (what encoding for a latent diffusion model usually takes)."""
        return self.mean  # (N, C, h, w)

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per example (N,): ``0.5 * sum(mean^2 + var - 1 - logvar)`` over all latent entries
        (Kingma & Welling, Appendix B), in float32 at least."""
        dtype = torch.promote_types(self.mean.dtype, torch.float32)
        mean, var, logvar = self.mean.to(dtype), self.var.to(dtype), self.logvar.to(dtype)
        return 0.5 * (mean.square() + var - 1.0 - logvar).flatten(1).sum(dim=1)  # (N,)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=NORM_EPS)


class ResnetBlock(nn.Module):
    """LDM's residual block without a time embedding: ``shortcut(x) + conv2(drop(silu(norm2(conv1(silu(norm1(x)))))))``,
    the shortcut a 1x1 conv when the channel count changes, else the identity."""

    def __init__(self, in_channels: int, out_channels: int, *, groups: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (N, Co, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (N, Co, H, W)
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)  # (N, Co, H, W)
        return skip + h  # (N, Co, H, W)


class SelfAttention(nn.Module):
    """Single-head self-attention over the h*w positions of the bottom feature map, with a residual connection
    (LDM's ``AttnBlock``): GroupNorm, q/k/v by linear maps of each position's channels, softmax(q k^T / sqrt(C)) v,
    an output projection. One head over all C channels, as in LDM and Stable Diffusion."""

    def __init__(self, channels: int, *, groups: int):
        super().__init__()
        self.group_norm = _norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Sequential(nn.Linear(channels, channels))  # a list only so the key is diffusers' to_out.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (N, hw, C)
        out = F.scaled_dot_product_attention(self.to_q(tokens), self.to_k(tokens), self.to_v(tokens))  # (N, hw, C)
        out = self.to_out(out)  # (N, hw, C)
        return x + out.transpose(1, 2).reshape(n, c, h, w)  # (N, C, h, w)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv after padding one pixel on the right and bottom only (LDM's
    asymmetric padding: with it an even side 2s gives exactly s and the kernel windows start at pixel 0)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 1, 0, 1))  # (N, C, H + 1, W + 1)
        return self.conv(x)  # (N, C, H/2, W/2)


class MidBlock(nn.Module):
    """The bottom of encoder and decoder: ResBlock, self-attention (optional), ResBlock, at constant width."""

    def __init__(self, channels: int, *, groups: int, dropout: float, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups=groups, dropout=dropout)
                                      for _ in range(2)])
        self.attentions = nn.ModuleList([SelfAttention(channels, groups=groups)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.resnets[0](x)  # (N, C, h, w)
        for attention in self.attentions:
            h = attention(h)  # (N, C, h, w)
        return self.resnets[1](h)  # (N, C, h, w)


class DownLevel(nn.Module):
    """One encoder resolution level: ResBlocks, then a Downsample unless it is the last level."""

    def __init__(self, in_channels: int, out_channels: int, *, layers: int, downsample: bool, **block):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_channels if j == 0 else out_channels, out_channels, **block)
                                      for j in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)  # (N, Co, H_i, W_i)
        for downsampler in self.downsamplers:
            x = downsampler(x)  # (N, Co, H_i / 2, W_i / 2)
        return x


class UpLevel(nn.Module):
    """One decoder resolution level: ResBlocks, then an Upsample (nearest, 3x3 conv) unless it is the last."""

    def __init__(self, in_channels: int, out_channels: int, *, layers: int, upsample: bool, **block):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_channels if j == 0 else out_channels, out_channels, **block)
                                      for j in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)  # (N, Co, H_i, W_i)
        for upsampler in self.upsamplers:
            x = upsampler(x)  # (N, Co, 2 H_i, 2 W_i)
        return x


class Encoder(nn.Module):
    """Image -> the posterior's moments before quant_conv: (N, C, H, W) -> (N, 2 * latent_channels, H/f, W/f)."""

    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        block = dict(groups=c.norm_groups, dropout=c.dropout)
        widths = c.block_channels
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownLevel(widths[max(i - 1, 0)], width, layers=c.layers_per_block, downsample=i < len(widths) - 1, **block)
            for i, width in enumerate(widths)])
        self.mid_block = MidBlock(widths[-1], attention=c.mid_attention, **block)
        self.conv_norm_out = _norm(widths[-1], c.norm_groups)
        self.conv_out = nn.Conv2d(widths[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (N, block_channels[0], H, W)
        for level in self.down_blocks:
            h = level(h)  # (N, block_channels[i], H / 2^(i+1), W / 2^(i+1)); the last level keeps its size
        h = self.mid_block(h)  # (N, block_channels[-1], H/f, W/f)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (N, 2 * latent_channels, H/f, W/f)


class Decoder(nn.Module):
    """Latent -> image: (N, latent_channels, H/f, W/f) -> (N, out_channels, H, W); the levels run widest first."""

    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        block = dict(groups=c.norm_groups, dropout=c.dropout)
        widths = c.block_channels[::-1]
        self.conv_in = nn.Conv2d(c.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], attention=c.mid_attention, **block)
        self.up_blocks = nn.ModuleList([
            UpLevel(widths[max(i - 1, 0)], width, layers=c.layers_per_block + 1, upsample=i < len(widths) - 1, **block)
            for i, width in enumerate(widths)])
        self.conv_norm_out = _norm(widths[-1], c.norm_groups)
        self.conv_out = nn.Conv2d(widths[-1], c.out_channels or c.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)  # (N, block_channels[-1], H/f, W/f)
        h = self.mid_block(h)  # (N, block_channels[-1], H/f, W/f)
        for level in self.up_blocks:
            h = level(h)  # (N, reversed block_channels[i], 2^(i+1) H/f, 2^(i+1) W/f); the last level keeps its size
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (N, out_channels, H, W)


class Autoencoder(nn.Module):
    """LDM's KL autoencoder: ``encode(x) -> DiagonalGaussian`` over latents (N, latent_channels, H/f, W/f),
    ``decode(z) -> (N, out_channels, H, W)``, and ``forward(x) -> (decode(posterior sample), posterior)`` for
    training. Images are in [-1, 1]. See the module doc for the layout and the names."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        if c.quant_conv:
            self.quant_conv = nn.Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1)
            self.post_quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1)
        else:
            self.quant_conv = self.post_quant_conv = None

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """The posterior q(z | x) of images x (N, in_channels, H, W), sides divisible by f."""
        c = self.config
        f = c.downsampling_factor
        if x.ndim != 4 or x.shape[1] != c.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise DifflabError(f"autoencoder input of shape {tuple(x.shape)} does not fit the model: it needs "
                               f"(N, {c.in_channels}, H, W) with H and W divisible by {f}")
        moments = self.encoder(x)  # (N, 2 * latent_channels, H/f, W/f)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)  # (N, 2 * latent_channels, H/f, W/f)
        return DiagonalGaussian(moments, logvar_min=c.logvar_min, logvar_max=c.logvar_max)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (N, out_channels, H, W) from latents z (N, latent_channels, H/f, W/f)."""
        c = self.config
        if z.ndim != 4 or z.shape[1] != c.latent_channels:
            raise DifflabError(f"latent of shape {tuple(z.shape)} does not fit the autoencoder: it needs "
                               f"(N, {c.latent_channels}, h, w)")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)  # (N, latent_channels, h, w)
        return self.decoder(z)  # (N, out_channels, h * f, w * f)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator)  # (N, latent_channels, H/f, W/f)
        return self.decode(z), posterior  # (N, out_channels, H, W)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's final conv weight, where LDM measures gradient norms for its adaptive GAN weight
        (:func:`difflab.nn.discriminator.adaptive_gan_weight`)."""
        return self.decoder.conv_out.weight
