"""The diffusion U-Net of DDPM (Ho et al. 2020, Appendix B) with ADM's refinements (Dhariwal & Nichol 2021).

    x (N, C, H, W) --conv_in--> [down: num_blocks x (ResBlock [+ Attention]), Downsample] x levels
                              --> middle: ResBlock, Attention, ResBlock
                              --> [up: (num_blocks + 1) x (concat skip, ResBlock [+ Attention]), Upsample] x levels
                              --> GroupNorm, SiLU, conv_out (zero-init) --> (N, out_channels, H, W)

Every ResBlock sees the embedding ``MLP(sinusoid(c_noise)) [+ class_embedding(cond)]``. A text-conditional U-Net
(``context_dim`` set; tutorial §6, LDM §3.3) has a spatial transformer in every attention slot instead: self-attention,
then cross-attention from the image positions to the prompt's token vectors (padding masked), then a GEGLU
feed-forward (``layers.SpatialTransformer``). The network owns
parameters only: it knows nothing about noise schedules or what its output means (eps, x0, v or EDM's F);
that is the parameterization's job (``difflab.denoisers``). A checkpoint is its weights plus
``dataclasses.asdict(config)`` as JSON, which rebuilds it with ``UNet(UNetConfig(**json.load(f)))``.

Zero-initialisation: conv_out, the second conv of every ResBlock and every attention output projection
start at zero (see ``layers.py``), so an untrained U-Net outputs exactly 0 and every block is its skip path:
an eps-predicting denoiser starts as "predict no noise" (D(x) = x), and training starts well conditioned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from difflab.errors import DifflabError
from difflab.nn.layers import (
    Attention,
    Downsample,
    ResBlock,
    SpatialTransformer,
    Upsample,
    group_norm,
    timestep_embedding,
    zero_,
)


@dataclass(frozen=True)
class UNetConfig:
    """Everything needed to rebuild a :class:`UNet`; round-trips through ``asdict`` -> JSON -> ``UNetConfig(**d)``.

    Lists (as JSON gives back) are turned into tuples; nonsense raises :class:`DifflabError`.
    """

    image_size: int                      # training resolution (square); sets where attention sits
    in_channels: int = 1                 # image channels in
    out_channels: int | None = None      # channels out; None means in_channels
    base_channels: int = 64              # channels at full resolution; level i has base * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 2)  # one entry per resolution level; the image halves between levels
    num_blocks: int = 2                  # ResBlocks per level on the way down (num_blocks + 1 on the way up)
    attn_resolutions: tuple[int, ...] = ()  # feature-map sizes (e.g. 16) with self-attention after each ResBlock
    num_heads: int = 4                   # attention heads; must divide the channels wherever attention is used
    dropout: float = 0.0                 # dropout inside every ResBlock
    num_classes: int | None = None       # class-conditional when set: embedding rows 0..num_classes-1 + a "null" row
    groups: int = 32                     # GroupNorm groups (clamped to gcd(groups, channels))
    scale_shift: bool = True             # FiLM time conditioning (ADM); False = DDPM's additive embedding
    context_dim: int | None = None       # text-conditional when set: the width of the prompt's token vectors; every
                                         # attention block (attn_resolutions and the middle) becomes a spatial
                                         # transformer with cross-attention to them (LDM)
    transformer_depth: int = 1           # transformer blocks per spatial transformer
    text_encoder: dict | None = None     # a from-scratch text encoder trained with the U-Net (difflab.nn.text config);
                                         # its weights are part of the U-Net's (keys text_encoder.*)

    def __post_init__(self) -> None:
        for name in ("channel_mult", "attn_resolutions"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _validate(self)

    @property
    def downsampling_factor(self) -> int:
        """How much smaller the lowest-resolution feature map is than the input: ``2 ** (levels - 1)``."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def resolutions(self) -> tuple[int, ...]:
        """The feature-map size at each level, top to bottom (e.g. 32, 16, 8, 4)."""
        return tuple(self.image_size // 2**i for i in range(len(self.channel_mult)))


def _validate(c: UNetConfig) -> None:
    """Raise a one-line :class:`DifflabError` for a config that cannot build a sensible network."""
    ints = {"image_size": c.image_size, "in_channels": c.in_channels, "base_channels": c.base_channels,
            "num_blocks": c.num_blocks, "num_heads": c.num_heads, "groups": c.groups}
    if c.out_channels is not None:
        ints["out_channels"] = c.out_channels
    if c.num_classes is not None:
        ints["num_classes"] = c.num_classes
    for name, value in ints.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DifflabError(f"U-Net {name} must be a positive integer, got {value!r}")
    if not c.channel_mult or any(not isinstance(m, int) or m < 1 for m in c.channel_mult):
        raise DifflabError(f"U-Net channel_mult must be a non-empty list of positive integers, got {list(c.channel_mult)}")
    if c.context_dim is not None and (not isinstance(c.context_dim, int) or isinstance(c.context_dim, bool)
                                      or c.context_dim < 1):
        raise DifflabError(f"U-Net context_dim must be a positive integer, got {c.context_dim!r}")
    if not isinstance(c.transformer_depth, int) or isinstance(c.transformer_depth, bool) or c.transformer_depth < 1:
        raise DifflabError(f"U-Net transformer_depth must be a positive integer, got {c.transformer_depth!r}")
    if c.text_encoder is not None:
        if not isinstance(c.text_encoder, dict) or c.context_dim is None:
            raise DifflabError("a U-Net text_encoder needs a config dict and context_dim set to the encoder's width")
        if c.text_encoder.get("width") != c.context_dim:
            raise DifflabError(f"the U-Net's context_dim {c.context_dim} differs from its text encoder's width "
                               f"{c.text_encoder.get('width')}")
    if not 0.0 <= c.dropout < 1.0:
        raise DifflabError(f"U-Net dropout must be in [0, 1), got {c.dropout}")
    factor = c.downsampling_factor
    if c.image_size % factor:
        fit = max(factor, round(c.image_size / factor) * factor)
        raise DifflabError(
            f"image size {c.image_size} is not divisible by the U-Net's downsampling factor {factor} "
            f"({len(c.channel_mult)} levels in channel_mult): resize or pad the images to {fit}, "
            f"or use fewer levels")
    bad = [r for r in c.attn_resolutions if r not in c.resolutions]
    if bad:
        raise DifflabError(f"attention resolution(s) {bad} never occur: the feature maps of a {c.image_size}px "
                           f"U-Net with {len(c.channel_mult)} levels are {list(c.resolutions)}")
    # Attention runs at the listed levels and always in the middle (the last level's channel count).
    attn_levels = {i for i, r in enumerate(c.resolutions) if r in c.attn_resolutions} | {len(c.channel_mult) - 1}
    for i in sorted(attn_levels):
        ch = c.base_channels * c.channel_mult[i]
        if ch % c.num_heads:
            raise DifflabError(f"num_heads {c.num_heads} does not divide the {ch} channels at resolution "
                               f"{c.resolutions[i]} where attention runs; choose a divisor of {ch}")


# Named sizes. ``attn_divisors`` puts attention at image_size // d; unet_config() resolves it into the
# absolute ``attn_resolutions`` that the stored config holds.
PRESETS: dict[str, dict] = {
    # CPU tests and the 8x8 digits demo: 8 -> 4, attention at 4x4.
    "tiny": dict(base_channels=32, channel_mult=(1, 2), num_blocks=1, attn_divisors=(2,), num_heads=4,
                 dropout=0.0),
    # Fashion-MNIST 28 -> 14 -> 7 (or 32 -> 16 -> 8), attention at the lowest resolution.
    "small": dict(base_channels=64, channel_mult=(1, 2, 2), num_blocks=2, attn_divisors=(4,), num_heads=4,
                  dropout=0.1),
    # DDPM's CIFAR-10 model (35.7M parameters): additive time embedding, one head, attention at 16x16.
    "ddpm-cifar10": dict(base_channels=128, channel_mult=(1, 2, 2, 2), num_blocks=2, attn_divisors=(2,),
                         num_heads=1, dropout=0.1, scale_shift=False),
}


def unet_config(preset: str, *, image_size: int, in_channels: int, **overrides) -> UNetConfig:
    """The :class:`UNetConfig` of a named preset for images of ``image_size`` with ``in_channels``;
    ``overrides`` replace any field (e.g. ``num_classes=10``, ``attn_resolutions=(8, 16)``)."""
    if preset not in PRESETS:
        raise DifflabError(f"unknown U-Net preset '{preset}' (choose from {', '.join(PRESETS)})")
    fields = {f.name for f in dataclasses.fields(UNetConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise DifflabError(f"unknown U-Net option(s) {', '.join(unknown)} (valid: {', '.join(sorted(fields))})")
    kwargs = dict(PRESETS[preset])
    divisors = kwargs.pop("attn_divisors")
    kwargs["attn_resolutions"] = tuple(image_size // d for d in divisors)
    kwargs.update(overrides)
    return UNetConfig(image_size=image_size, in_channels=in_channels, **kwargs)


def attend(attn: nn.Module, h: torch.Tensor, context: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Run one attention slot: a spatial transformer takes the context (tokens, mask), the others only ``h``."""
    return attn(h, *context) if isinstance(attn, SpatialTransformer) else attn(h)


class Level(nn.Module):
    """The blocks at one resolution: ResBlocks, each followed by Attention or Identity, then an optional
    resampling layer. A container only: :meth:`UNet.forward` walks it, because skip connections are pushed
    (down) or popped (up) between its blocks."""

    def __init__(self, blocks: list[ResBlock], attns: list[nn.Module], resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)
        self.resample = resample


class ContractingPath(nn.Module):
    """The U-Net's first half (Ronneberger et al.'s "contracting path"): embedding, ``conv_in``, the down path
    and the middle. :class:`UNet` adds the expanding path; :class:`UNetClassifier` a pooling head. (Both inherit
    these modules under the same names, so the state-dict keys of a U-Net are the same as if it were written in
    one class.)"""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        self.emb_dim = emb_dim = 4 * c.base_channels
        self.block_kwargs = block = dict(emb_dim=emb_dim, dropout=c.dropout, groups=c.groups, scale_shift=c.scale_shift)
        self.attn_kwargs = dict(num_heads=c.num_heads, groups=c.groups)
        widths = [c.base_channels * m for m in c.channel_mult]
        use_attn = [r in c.attn_resolutions for r in c.resolutions]

        # Timestep (and class) embedding: sinusoid of width base_channels, then an MLP to 4 * base_channels.
        self.time_mlp = nn.Sequential(nn.Linear(c.base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(c.num_classes + 1, emb_dim) if c.num_classes is not None else None
        # Text: the prompt's token vectors, normalised once, are the context every spatial transformer attends to.
        self.context_norm = nn.LayerNorm(c.context_dim) if c.context_dim is not None else None
        self.text_encoder = None
        if c.text_encoder is not None:
            from difflab.nn.text import text_encoder_from_config  # the from-scratch encoder, trained with the U-Net

            self.text_encoder = text_encoder_from_config(c.text_encoder)

        self.conv_in = nn.Conv2d(c.in_channels, c.base_channels, 3, padding=1)
        self.skip_channels = skips = [c.base_channels]  # channels of every tensor pushed for the up path
        ch = c.base_channels
        self.down = nn.ModuleList()
        for i, width in enumerate(widths):
            blocks, attns = [], []
            for _ in range(c.num_blocks):
                blocks.append(ResBlock(ch, width, **block))
                attns.append(self.attention(width) if use_attn[i] else nn.Identity())
                ch = width
                skips.append(ch)
            last = i == len(widths) - 1
            self.down.append(Level(blocks, attns, None if last else Downsample(ch)))
            if not last:
                skips.append(ch)

        self.mid_block1 = ResBlock(ch, ch, **block)
        self.mid_attn = self.attention(ch)
        self.mid_block2 = ResBlock(ch, ch, **block)
        self.bottom_channels = ch

    def attention(self, channels: int) -> nn.Module:
        """The attention block at one position: self-attention, or a spatial transformer for a text model."""
        c = self.config
        if c.context_dim is None:
            return Attention(channels, **self.attn_kwargs)
        return SpatialTransformer(channels, **self.attn_kwargs, context_dim=c.context_dim, depth=c.transformer_depth)

    def context(self, cond, n: int) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
        """Split ``cond`` into class labels (N,) and the cross-attention context (tokens (N, L, D), mask (N, L)).

        A text cond is a mapping with ``tokens`` (the encoder's output) and ``mask``, or -- for a U-Net that owns a
        from-scratch text encoder -- ``ids`` and ``mask`` that it encodes itself (training, where the encoder learns)."""
        c = self.config
        if not isinstance(cond, Mapping):
            if c.context_dim is not None:
                raise DifflabError("this U-Net is text-conditional: it needs a prompt's tokens and mask as its condition "
                                   "(the empty prompt's for unconditional sampling)")
            return cond, None
        if c.context_dim is None:
            raise DifflabError("a text condition was given to a U-Net without cross-attention (set context_dim)")
        mask = cond["mask"]
        if "tokens" in cond:
            tokens = cond["tokens"]
        elif self.text_encoder is not None:
            tokens = self.text_encoder(cond["ids"], mask).tokens
        else:
            raise DifflabError("a text condition needs the prompt's token vectors ('tokens')")
        if tokens.shape[0] != n or tokens.shape[-1] != c.context_dim or mask.shape != tokens.shape[:2]:
            raise DifflabError(f"text condition of shape {tuple(tokens.shape)} (mask {tuple(mask.shape)}) does not fit "
                               f"{n} images and the U-Net's context width {c.context_dim}")
        return cond.get("labels"), (self.context_norm(tokens), mask.bool())  # (N, L, D), (N, L)

    def embed(self, x: torch.Tensor, c_noise: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """Check the input and return the (N, 4 * base_channels) embedding of the noise level [+ class]."""
        c = self.config
        n, channels, height, width = x.shape
        if channels != c.in_channels or height % c.downsampling_factor or width % c.downsampling_factor:
            raise DifflabError(f"U-Net input of shape {tuple(x.shape)} does not fit the model: it needs "
                               f"{c.in_channels} channels and sides divisible by {c.downsampling_factor}")
        c_noise = torch.as_tensor(c_noise, device=x.device).reshape(-1).expand(n)  # (N,)
        emb = self.time_mlp(timestep_embedding(c_noise, c.base_channels))  # (N, E)
        if self.class_embed is not None:
            if cond is None:  # no condition: the learned null class
                cond = torch.full((n,), c.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.class_embed(cond)  # (N, E)
        elif cond is not None:
            raise DifflabError("a condition was given to an unconditional U-Net (set num_classes in its config)")
        return emb

    def contract(self, x: torch.Tensor, emb: torch.Tensor, context=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Down path and middle: the bottom feature map and the skip tensors the up path consumes."""
        h = self.conv_in(x)  # (N, base, H, W)
        hs = [h]
        for level in self.down:
            for block, attn in zip(level.blocks, level.attns):
                h = attend(attn, block(h, emb), context)  # (N, width, H_i, W_i)
                hs.append(h)
            if level.resample is not None:
                h = level.resample(h)  # (N, width, H_i / 2, W_i / 2)
                hs.append(h)

        h = self.mid_block1(h, emb)  # (N, ch, H / f, W / f)
        h = attend(self.mid_attn, h, context)  # (N, ch, H / f, W / f)
        h = self.mid_block2(h, emb)  # (N, ch, H / f, W / f)
        return h, hs


class UNet(ContractingPath):
    """The diffusion U-Net: ``UNet(config)(x, c_noise, cond) -> (N, out_channels, H, W)``.

    ``c_noise`` is the noise level as the parameterization presents it (:mod:`difflab.denoisers`): a float
    tensor (N,) or a scalar -- the (possibly non-integer) DDPM timestep for VP models, ln(sigma) / 4 for EDM.
    ``cond`` is what the model is conditioned on (:mod:`difflab.conditioning`): class labels (N,) long, a text
    condition ``{"tokens": (N, L, D), "mask": (N, L)}`` for a text model (see :meth:`context`), or None;
    with ``num_classes`` set, None (or the label ``num_classes``) means the learned null class that
    classifier-free guidance uses; the labels become a class embedding added to the noise-level embedding.
    See the module doc for the layout and the zero-initialisation.
    """

    def __init__(self, config: UNetConfig):
        super().__init__(config)
        c = config
        widths = [c.base_channels * m for m in c.channel_mult]
        use_attn = [r in c.attn_resolutions for r in c.resolutions]
        skips, ch = list(self.skip_channels), self.bottom_channels
        self.up = nn.ModuleList()
        for i, width in reversed(list(enumerate(widths))):
            blocks, attns = [], []
            for _ in range(c.num_blocks + 1):  # one more than down: the downsample's output is a skip too
                blocks.append(ResBlock(ch + skips.pop(), width, **self.block_kwargs))
                attns.append(self.attention(width) if use_attn[i] else nn.Identity())
                ch = width
            self.up.append(Level(blocks, attns, Upsample(ch) if i > 0 else None))
        assert not skips, "every skip connection must be consumed"

        self.norm_out = group_norm(ch, c.groups)
        # Zero: the untrained network outputs exactly 0 (see the module doc).
        self.conv_out = zero_(nn.Conv2d(ch, c.out_channels or c.in_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond=None) -> torch.Tensor:
        labels, context = self.context(cond, x.shape[0])  # (N,) or None; ((N, L, D), (N, L)) or None
        emb = self.embed(x, c_noise, labels)  # (N, E)
        h, hs = self.contract(x, emb, context)  # (N, ch, H / f, W / f) and the skips
        for level in self.up:
            for block, attn in zip(level.blocks, level.attns):
                h = attend(attn, block(torch.cat([h, hs.pop()], dim=1), emb), context)  # (N, width, H_i, W_i)
            if level.resample is not None:
                h = level.resample(h)  # (N, width, 2 H_i, 2 W_i)

        return self.conv_out(torch.nn.functional.silu(self.norm_out(h)))  # (N, out_channels, H, W)


class UNetClassifier(ContractingPath):
    """The network of a noise-aware classifier (Dhariwal & Nichol 2021, §4.1): the U-Net's contracting path,
    conditioned on the noise level through the same embedding, with a pooling head: GroupNorm, SiLU, global
    average pool, linear.

    ``UNetClassifier(config, num_outputs)(x_t, c_noise) -> (N, num_outputs)`` logits of p(y | x_t, t)."""

    def __init__(self, config: UNetConfig, num_outputs: int):
        if config.num_classes is not None or config.context_dim is not None:
            raise DifflabError("a noise-aware classifier takes no class labels or prompts as input (num_classes and "
                               "context_dim must be unset)")
        super().__init__(config)
        self.num_outputs = num_outputs
        self.norm_out = group_norm(self.bottom_channels, config.groups)
        self.head = nn.Linear(self.bottom_channels, num_outputs)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        emb = self.embed(x, c_noise, None)  # (N, E)
        h, _ = self.contract(x, emb)  # (N, ch, H / f, W / f)
        h = torch.nn.functional.silu(self.norm_out(h)).mean(dim=(2, 3))  # (N, ch)  global average pool
        return self.head(h)  # (N, num_outputs)
