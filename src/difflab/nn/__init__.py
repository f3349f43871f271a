"""Networks: they own parameters and nothing else (see DESIGN.md). Each is built from a JSON-able config."""

from difflab.nn.domain_classifier import DomainClassifier, DomainClassifierConfig
from difflab.nn.unet import PRESETS, ContractingPath, UNet, UNetClassifier, UNetConfig, unet_config

__all__ = ["PRESETS", "ContractingPath", "DomainClassifier", "DomainClassifierConfig", "UNet", "UNetClassifier",
           "UNetConfig", "unet_config"]
from difflab.nn.discriminator import (  # noqa: E402
    DiscriminatorConfig,
    PatchDiscriminator,
    adaptive_gan_weight,
    hinge_d_loss,
    hinge_g_loss,
)
from difflab.nn.vae import (  # noqa: E402
    VAE_PRESETS,
    Autoencoder,
    AutoencoderConfig,
    DiagonalGaussian,
    autoencoder_config,
)

__all__ += ["VAE_PRESETS", "Autoencoder", "AutoencoderConfig", "DiagonalGaussian", "DiscriminatorConfig",
            "PatchDiscriminator", "adaptive_gan_weight", "autoencoder_config", "hinge_d_loss", "hinge_g_loss"]
