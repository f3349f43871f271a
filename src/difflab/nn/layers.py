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


# ---------------------------------------------------------------------------------------------------------
# Cross-attention: the LDM "spatial transformer" (Rombach et al. 2022, §3.3 and Appendix; tutorial §6).
#
#     Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V,   Q = W_Q phi(z_t),   K = W_K tau(y),   V = W_V tau(y)
#
# phi(z_t) are the image positions of a feature map, tau(y) the token vectors of the prompt (context): every
# image position attends to every real (unpadded) token. The block wraps self-attention -> cross-attention ->
# gated feed-forward, each pre-LayerNorm with a residual, between a projection in and a zero-initialised
# projection out, so at initialisation the whole block is the identity on its skip path.
# ---------------------------------------------------------------------------------------------------------


class MultiHeadAttention(nn.Module):
    """Multi-head attention of queries ``(N, Lq, C)`` over keys/values ``(N, Lk, C_kv)``: self-attention when no
    context is given, cross-attention otherwise. ``mask`` (N, Lk) bool marks the keys that may be attended to
    (True = a real token); an example whose mask is all False gets a zero output instead of softmax's NaN."""

    def __init__(self, channels: int, *, num_heads: int, context_dim: int | None = None):
        super().__init__()
        assert channels % num_heads == 0, f"{num_heads} heads do not divide {channels} channels"
        self.num_heads = num_heads
        self.q = nn.Linear(channels, channels, bias=False)
        self.kv = nn.Linear(context_dim or channels, 2 * channels, bias=False)
        self.out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        n, length, c = x.shape
        heads, d = self.num_heads, c // self.num_heads
        context = x if context is None else context
        q = self.q(x).unflatten(-1, (heads, d)).transpose(1, 2)  # (N, heads, Lq, d)
        k, v = self.kv(context).unflatten(-1, (2, heads, d)).permute(2, 0, 3, 1, 4).unbind(0)  # (N, heads, Lk, d)
        attn_mask, empty = None, None
        if mask is not None:
            empty = ~mask.any(dim=1)  # (N,)  no real token at all
            attn_mask = (mask | empty[:, None])[:, None, None, :]  # (N, 1, 1, Lk)  broadcast over heads, queries
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (N, heads, Lq, d)
        out = self.out(out.transpose(1, 2).flatten(2))  # (N, Lq, C)
        if empty is not None:
            out = out.masked_fill(empty[:, None, None], 0.0)
        return out


class GEGLU(nn.Module):
    """The gated feed-forward of the LDM transformer (Shazeer 2020, "GLU Variants Improve Transformer"):
    ``W_2 (x W_a * GELU(x W_g))`` with an inner width of ``mult * channels``."""

    def __init__(self, channels: int, mult: int = 4):
        super().__init__()
        self.proj = nn.Linear(channels, 2 * mult * channels)
        self.out = nn.Linear(mult * channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # (N, L, mult C) each
        return self.out(value * F.gelu(gate))  # (N, L, C)


class TransformerBlock(nn.Module):
    """``h += SelfAttn(LN(h)); h += CrossAttn(LN(h), context); h += GEGLU(LN(h))`` on the tokens of a feature map."""

    def __init__(self, channels: int, *, num_heads: int, context_dim: int):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(channels), MultiHeadAttention(channels, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(channels)
        self.attn2 = MultiHeadAttention(channels, num_heads=num_heads, context_dim=context_dim)
        self.norm3, self.ff = nn.LayerNorm(channels), GEGLU(channels)

    def forward(self, h: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = h + self.attn1(self.norm1(h))  # (N, HW, C)  image positions attend to each other
        h = h + self.attn2(self.norm2(h), context, mask)  # (N, HW, C)  ... and to the prompt's real tokens
        return h + self.ff(self.norm3(h))  # (N, HW, C)


class SpatialTransformer(nn.Module):
    """The LDM spatial transformer: GroupNorm, a projection in, ``depth`` :class:`TransformerBlock` s over the H*W
    positions with cross-attention to ``context`` (N, L, context_dim), and a zero-initialised projection out with a
    residual -- the identity at initialisation. ``forward(x, context, mask) -> (N, C, H, W)``."""

    def __init__(self, channels: int, *, num_heads: int, groups: int, context_dim: int, depth: int = 1):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(TransformerBlock(channels, num_heads=num_heads, context_dim=context_dim)
                                    for _ in range(depth))
        self.proj_out = zero_(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        n, c, height, width = x.shape
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (N, HW, C)
        for block in self.blocks:
            h = block(h, context, mask)  # (N, HW, C)
        return x + self.proj_out(h).transpose(1, 2).reshape(n, c, height, width)  # (N, C, H, W)
