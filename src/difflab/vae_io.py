"""Loading Stable Diffusion's VAE: a diffusers ``AutoencoderKL`` folder as a difflab :class:`Autoencoder`.

A diffusers autoencoder folder holds ``config.json`` (``"_class_name": "AutoencoderKL"``) and
``diffusion_pytorch_model.safetensors``; a pipeline folder holds one in ``vae/``. The config's fields map onto
:class:`AutoencoderConfig` and the weights load with ``strict=True`` (the module names are diffusers'), after a
check that names the first missing, unknown or mis-shaped tensors -- never a silent random init. Weights are
read with safetensors only; a pickled ``.bin`` is refused.

    loaded = load_diffusers_autoencoder("stabilityai/sd-vae-ft-mse")   # or a local folder
    z = loaded.autoencoder.encode(x).mode() * loaded.scaling_factor   # what the latent diffusion model sees
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from difflab import hub
from difflab.errors import DifflabError
from difflab.nn.vae import Autoencoder, AutoencoderConfig

WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLED_WEIGHTS = "diffusion_pytorch_model.bin"
# What to fetch from a Hub repository: the VAE at the top (sd-vae-ft-mse) or in vae/ (a whole pipeline), and
# nothing else (a pipeline's U-Net and text encoder are gigabytes).
HUB_FILES = ["config.json", WEIGHTS, "vae/config.json", f"vae/{WEIGHTS}"]


@dataclass
class LoadedAutoencoder:
    """An autoencoder with the latent statistics its diffusion model was trained with: the latent a diffusion
    model sees is ``(z - shift_factor) * scaling_factor`` (Rombach et al. 2022, §4.3.2 and Appendix G)."""

    autoencoder: Autoencoder
    scaling_factor: float
    shift_factor: float
    source: str                          # the folder or Hub id it was loaded from


def _vae_folder(path: Path) -> Path:
    """The folder holding the autoencoder's config.json: ``path`` itself or a pipeline's ``path/vae``."""
    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        return path / "vae"
    return path


def _read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise DifflabError(f"{folder} holds no config.json: pass a diffusers AutoencoderKL folder "
                           f"(config.json + {WEIGHTS}) or a pipeline folder with one in vae/") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DifflabError(f"cannot read {folder / 'config.json'}: {error}") from None
    if not isinstance(config, dict):
        raise DifflabError(f"{folder / 'config.json'} is not a JSON object")
    return config


def is_diffusers_autoencoder(path: str | Path) -> bool:
    """Whether ``path`` is a folder with a diffusers ``AutoencoderKL`` config (or a pipeline folder with one
    in ``vae/``). Reads only the config."""
    path = Path(path)
    if not path.is_dir():
        return False
    try:
        return _read_config(_vae_folder(path)).get("_class_name") == "AutoencoderKL"
    except DifflabError:
        return False


def autoencoder_config_from_diffusers(config: dict, *, source: str) -> AutoencoderConfig:
    """Map a diffusers ``AutoencoderKL`` config onto :class:`AutoencoderConfig`; refuse what difflab cannot
    build in one line. A field that is absent takes diffusers' default for it."""
    name = config.get("_class_name")
    if name != "AutoencoderKL":
        raise DifflabError(f"{source} holds a diffusers '{name}', not an AutoencoderKL")
    channels = config.get("block_out_channels", [64])
    if not isinstance(channels, list):
        raise DifflabError(f"{source}: block_out_channels must be a list of channel counts, got {channels!r}")
    levels = len(channels)
    for key, block in [("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")]:
        types = config.get(key, [block])
        if types != [block] * levels:
            raise DifflabError(f"{source}: {key} {types} is not supported: difflab builds {levels} x {block} "
                               f"(one per entry of block_out_channels)")
    if config.get("act_fn", "silu") != "silu":
        raise DifflabError(f"{source}: activation {config['act_fn']!r} is not supported "
                           f"(difflab's autoencoder uses silu)")
    quant, post_quant = config.get("use_quant_conv", True), config.get("use_post_quant_conv", True)
    if quant != post_quant:
        raise DifflabError(f"{source}: use_quant_conv={quant} with use_post_quant_conv={post_quant} is not supported "
                           f"(difflab has both 1x1 convs or neither)")
    for key in ("latents_mean", "latents_std"):
        if config.get(key) is not None:
            raise DifflabError(f"{source}: per-channel {key} is not supported (only scaling_factor and shift_factor)")
    return AutoencoderConfig(
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        latent_channels=config.get("latent_channels", 4),
        block_channels=channels,
        layers_per_block=config.get("layers_per_block", 1),
        norm_groups=config.get("norm_num_groups", 32),
        mid_attention=config.get("mid_block_add_attention", True),
        quant_conv=quant,
    )


def _first(items: list[str], k: int = 3) -> str:
    return ", ".join(items[:k]) + (f" (+{len(items) - k} more)" if len(items) > k else "")


def _check_state_dict(model: torch.nn.Module, weights: dict[str, torch.Tensor], *, source: str) -> None:
    """Refuse missing, unknown or mis-shaped tensors in one line naming the first few."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unknown = [k for k in weights if k not in expected]
    shapes = [f"{k} {tuple(weights[k].shape)} (model {tuple(v.shape)})"
              for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    problems = [f"{label}: {_first(items)}" for label, items in
                [("missing", missing), ("unknown", unknown), ("mis-shaped", shapes)] if items]
    if problems:
        raise DifflabError(f"the weights in {source} do not fit the autoencoder its config describes: "
                           f"{'; '.join(problems)}")


def load_diffusers_autoencoder(path_or_hub_id: str | Path, *, device: str | torch.device = "cpu") -> LoadedAutoencoder:
    """Load a diffusers ``AutoencoderKL`` (a local folder, a pipeline folder's ``vae/``, or a Hub id such as
    ``stabilityai/sd-vae-ft-mse`` when no such folder exists) as a float32 difflab autoencoder in eval mode."""
    path = Path(path_or_hub_id)
    source = str(path_or_hub_id)
    if not path.exists():
        if not hub.is_hub_id(source):  # runs/x: a local path, mistyped
            raise DifflabError(f"no such folder: {source} (pass a diffusers AutoencoderKL folder or a Hub id "
                               f"like stabilityai/sd-vae-ft-mse)")
        path = hub.download(source, allow=HUB_FILES, what=f"the repository (config.json + {WEIGHTS})")
    if not path.is_dir():
        raise DifflabError(f"{source} is not a folder: pass the diffusers AutoencoderKL folder that holds "
                           f"config.json and {WEIGHTS}")
    folder = _vae_folder(path)
    raw = _read_config(folder)
    config = autoencoder_config_from_diffusers(raw, source=source)

    weights_file = folder / WEIGHTS
    if not weights_file.is_file():
        if (folder / PICKLED_WEIGHTS).is_file():
            raise DifflabError(f"{folder} has only pickled weights ({PICKLED_WEIGHTS}), which difflab does not "
                               f"unpickle: convert them to {WEIGHTS} (diffusers: save_pretrained(..., "
                               f"safe_serialization=True))")
        raise DifflabError(f"{folder} has no weights file {WEIGHTS}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        weights = load_file(weights_file)
    except (SafetensorError, OSError) as error:
        raise DifflabError(f"cannot read {weights_file}: {error}") from None

    weights = _rename_deprecated_attention(weights)
    autoencoder = Autoencoder(config)
    _check_state_dict(autoencoder, weights, source=str(weights_file))
    autoencoder.load_state_dict(weights, strict=True)
    # 0.18215 only because diffusers' AutoencoderKL uses it for configs without the field (Stable Diffusion
    # 1.x/2.x's value); a config that states its factor (SDXL: 0.13025) is read as is.
    scaling = raw.get("scaling_factor")
    shift = raw.get("shift_factor")
    try:
        scaling, shift = float(0.18215 if scaling is None else scaling), float(0.0 if shift is None else shift)
    except (TypeError, ValueError):
        scaling = shift = float("nan")
    if not (math.isfinite(scaling) and scaling > 0 and math.isfinite(shift)):
        raise DifflabError(f"{folder / 'config.json'}: scaling_factor must be a positive number and shift_factor a "
                           f"number, got {raw.get('scaling_factor')!r} and {raw.get('shift_factor')!r}")
    return LoadedAutoencoder(autoencoder=autoencoder.to(device).eval(), scaling_factor=scaling, shift_factor=shift,
                             source=source)


# Attention parameter names of diffusers before 0.15 (PR 3387), still in many Hub uploads of Stable Diffusion's VAE;
# diffusers renames them when it loads, and so does difflab.
DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename_deprecated_attention(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    pattern = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
    renamed = {}
    for key, value in weights.items():
        m = pattern.match(key)
        renamed[f"{m[1]}{DEPRECATED_ATTENTION[m[2]]}.{m[3]}" if m else key] = value
    return renamed
