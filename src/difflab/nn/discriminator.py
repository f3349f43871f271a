"""The patch discriminator and GAN losses that train LDM's autoencoder (Rombach et al. 2022, Appendix G; Esser
et al. 2021, "Taming Transformers", §3.1 and eq. 7).

    x (N, C, H, W) in [-1, 1]
      --> conv 4x4 stride 2, LeakyReLU(0.2)                                   (N, base, H/2, W/2)
      --> (layers - 1) x [conv 4x4 stride 2, GroupNorm, LeakyReLU(0.2)]        (N, base * 2^i (at most 8x), ...)
      --> conv 4x4 stride 1, GroupNorm, LeakyReLU(0.2)                        (N, ..., H/2^layers - 1, ...)
      --> conv 4x4 stride 1 --> one logit per patch                          (N, 1, H/2^layers - 2, W/2^layers - 2)

Each logit sees a receptive field of a few dozen pixels (70 x 70 for 3 layers), so the discriminator judges
local texture, which a pixel loss blurs, and leaves global structure to the reconstruction loss (pix2pix,
Isola et al. 2017, §3.2.2). The generator's GAN term is weighted adaptively (:func:`adaptive_gan_weight`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import DifflabError
from difflab.nn.layers import group_norm


@dataclass(frozen=True)
class DiscriminatorConfig:
    """Everything needed to rebuild a :class:`PatchDiscriminator`."""

    in_channels: int = 3                 # image channels
    base_channels: int = 64              # width of the first conv; doubles per layer up to 8x
    layers: int = 3                      # stride-2 convs; each logit's receptive field grows with them
    norm_groups: int = 32                # GroupNorm groups (clamped to gcd(norm_groups, channels))

    def __post_init__(self) -> None:
        for name in ("in_channels", "base_channels", "layers", "norm_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DifflabError(f"discriminator {name} must be a positive integer, got {value!r}")

    @property
    def min_image_size(self) -> int:
        """The smallest image side that still gives one logit: H / 2^layers - 2 >= 1."""
        return 3 * 2**self.layers


class PatchDiscriminator(nn.Module):
    """pix2pix's / LDM's N-layer patch discriminator: ``PatchDiscriminator(config)(x) -> (N, 1, h, w)`` logits,
    one per overlapping patch ("real" is positive).

    GroupNorm instead of the original BatchNorm: it keeps no running statistics, so the discriminator behaves
    the same in train and eval mode, needs no buffer synchronisation under DDP, and its EMA is just an average
    of parameters. The convs before a norm have no bias (the norm's shift replaces it). Weights start from
    N(0, 0.02) and norm scales from N(1, 0.02), the DCGAN initialisation that pix2pix and LDM use.
    """

    def __init__(self, config: DiscriminatorConfig):
        super().__init__()
        self.config = c = config
        layers: list[nn.Module] = [nn.Conv2d(c.in_channels, c.base_channels, 4, stride=2, padding=1),
                                   nn.LeakyReLU(0.2)]
        ch = c.base_channels
        for i in range(1, c.layers + 1):
            out = c.base_channels * min(2**i, 8)
            stride = 2 if i < c.layers else 1  # the last of these keeps the resolution (pix2pix)
            layers += [nn.Conv2d(ch, out, 4, stride=stride, padding=1, bias=False), group_norm(out, c.norm_groups),
                       nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.GroupNorm):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels or min(x.shape[2:]) < c.min_image_size:
            raise DifflabError(f"discriminator input of shape {tuple(x.shape)} does not fit: it needs "
                               f"(N, {c.in_channels}, H, W) with H, W >= {c.min_image_size} for {c.layers} layers "
                               f"(use fewer layers for small images)")
        return self.layers(x)  # (N, 1, H / 2^layers - 2, W / 2^layers - 2)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss per example (N,): ``0.5 * (mean relu(1 - real) + mean relu(1 + fake))``
    over the patches (Lim & Ye 2017; LDM's weighting of 1/2)."""
    loss_real = F.relu(1.0 - logits_real).flatten(1).mean(dim=1)  # (N,)
    loss_fake = F.relu(1.0 + logits_fake).flatten(1).mean(dim=1)  # (N,)
    return 0.5 * (loss_real + loss_fake)  # (N,)


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's (decoder's) GAN loss per example (N,): ``-mean(logits_fake)`` over the patches."""
    return -logits_fake.flatten(1).mean(dim=1)  # (N,)


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, *,
                        max_weight: float = 1e4, eps: float = 1e-4) -> torch.Tensor:
    """The weight of the GAN term in the autoencoder's loss (Esser et al. 2021, eq. 7; LDM):

        lambda = ||grad_L rec_loss|| / (||grad_L g_loss|| + eps),  clamped to [0, max_weight], detached,

    with L the decoder's last layer (``Autoencoder.last_layer``). It balances the two gradients where they
    meet the output, so neither term drowns the other whatever their scales. Non-scalar losses (per-example)
    are averaged first. The graph is kept (``retain_graph=True``) for the backward pass of the total loss.
    """
    rec_grad, = torch.autograd.grad(rec_loss.mean(), last_layer, retain_graph=True)
    g_grad, = torch.autograd.grad(g_loss.mean(), last_layer, retain_graph=True)
    weight = rec_grad.norm() / (g_grad.norm() + eps)
    return weight.clamp(0.0, max_weight).detach()
