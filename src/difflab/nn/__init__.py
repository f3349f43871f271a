"""Networks: they own parameters and nothing else (see DESIGN.md). Each is built from a JSON-able config."""

from difflab.nn.domain_classifier import DomainClassifier, DomainClassifierConfig
from difflab.nn.unet import PRESETS, ContractingPath, UNet, UNetClassifier, UNetConfig, unet_config

__all__ = ["PRESETS", "ContractingPath", "DomainClassifier", "DomainClassifierConfig", "UNet", "UNetClassifier",
           "UNetConfig", "unet_config"]
