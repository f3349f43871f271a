"""Building blocks of the diffusion U-Net: timestep embedding, residual block, self-attention, resampling.

The blocks follow DDPM (Ho et al. 2020, Appendix B) and its refinement ADM (Dhariwal & Nichol 2021, §3):
pre-activation residual blocks (GroupNorm -> SiLU -> conv), the timestep entering every block through a
learned projection, and multi-head self-attention over all H*W positions at chosen resolutions.

Zero-initialisation: the last layer of every residual branch (the second conv of a ResBlock, the output
projection of an Attention block) starts at zero, so every block starts as the identity on its skip path.
A deep stack of identities is well conditioned at step 0 — activations neither explode nor vanish with
depth — which is why ADM (and DiT after it) train stably without warm-up tricks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def zero_(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero in place and return it (see the module doc for why)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with ``gcd(groups, channels)`` groups, so a tiny model with e.g. 8 channels still works
    with the default of 32 groups (the group count must divide the channel count)."""
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly non-integer) timesteps, as in the Transformer and DDPM.

    Frequencies are ``max_period ** (-i / (half - 1))`` for ``i < half = dim // 2`` (DDPM's convention: the
    lowest frequency is exactly 1 / max_period); the output is ``[sin(t f), cos(t f)]``, zero-padded when
    ``dim`` is odd. Always computed in float32: bf16 cannot resolve t = 999 vs 1000 once multiplied out.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) / max(half - 1, 1)
    freqs = torch.exp(-math.log(max_period) * exponent)  # (half,)
    args = t.to(torch.float32)[:, None] * freqs[None, :]  # (N, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (N, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))  # (N, dim)
    return emb


class ResBlock(nn.Module):
    """Pre-activation residual block conditioned on an embedding (timestep + class).

    ``x + conv(drop(silu(film(norm(conv(silu(norm(x))))))))`` where the embedding enters as FiLM (ADM's
    "AdaGN", ``norm(h) * (1 + scale) + shift``) when ``scale_shift`` is true, or is added before the second
    norm as in the original DDPM when it is false. The second conv is zero-initialised, so the block starts
    as its skip path; the skip is a 1x1 conv when the channel count changes.
    """

    def __init__(self, in_channels: int, out_channels: int, *, emb_dim: int, dropout: float, groups: int,
                 scale_shift: bool = True):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        # FiLM needs a scale and a shift per channel, the additive form one shift.
        self.emb_proj = nn.Linear(emb_dim, out_channels * (2 if scale_shift else 1))
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (N, Co, H, W)
        e = self.emb_proj(F.silu(emb))[:, :, None, None]  # (N, 2Co or Co, 1, 1)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)  # (N, Co, 1, 1) each
            h = self.norm2(h) * (1 + scale) + shift  # (N, Co, H, W)
        else:
            h = self.norm2(h + e)  # (N, Co, H, W)
        h = self.conv2(self.dropout(F.silu(h)))  # (N, Co, H, W)
        return self.skip(x) + h  # (N, Co, H, W)


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, with a residual connection.

    GroupNorm, then q, k, v from one linear map of each position's channels (a 1x1 conv), scaled
    dot-product attention per head (``softmax(q k^T / sqrt(d)) v``, via
    :func:`torch.nn.functional.scaled_dot_product_attention`, which picks a flash / memory-efficient kernel
    when one applies), and a zero-initialised output projection so the block starts as the identity.

    The tokens are taken as ``(N, H*W, C)``: for a channels_last input that is a free view, and linear
    layers on the last dim then need no copy.
    """

    def __init__(self, channels: int, *, num_heads: int, groups: int):
        super().__init__()
        assert channels % num_heads == 0, f"{num_heads} heads do not divide {channels} channels"
        self.num_heads = num_heads
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (N, HW, C)
        qkv = self.qkv(tokens).unflatten(-1, (3, self.num_heads, c // self.num_heads))  # (N, HW, 3, heads, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (N, heads, HW, d) each
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, HW, d)
        out = self.proj(out.transpose(1, 2).flatten(2))  # (N, HW, C)
        return x + out.transpose(1, 2).reshape(n, c, h, w)  # (N, C, H, W)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv (DDPM's learned downsampling; keeps channels)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # (N, C, H/2, W/2)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling then a 3x3 conv (no transposed conv, which
    leaves checkerboard artefacts)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (N, C, 2H, 2W)
        return self.conv(x)  # (N, C, 2H, 2W)
