"""Networks: they own parameters and nothing else (see DESIGN.md). Each is built from a JSON-able config."""

from difflab.nn.unet import PRESETS, EncoderClassifier, UNet, UNetConfig, unet_config

__all__ = ["PRESETS", "EncoderClassifier", "UNet", "UNetConfig", "unet_config"]
