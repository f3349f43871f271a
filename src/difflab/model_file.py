"""One self-describing file per model (``difflab export --format safetensors``): the network's weights under ``net.``,
a latent model's autoencoder under ``vae.``, and the model config (JSON) in the safetensors metadata.

    difflab.export("runs/digits", "digits.safetensors", format="safetensors")
    model = difflab.load("digits.safetensors")        # and every difflab command reads it

A model with a pretrained Hugging Face text encoder keeps pointing at that encoder (its config names it), as its
checkpoints do; everything else the model needs is in the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from difflab.devices import resolve_device
from difflab.encoders import LatentEncoder
from difflab.errors import DifflabError
from difflab.models import MODEL_FORMAT, Model, build
from difflab.training.checkpoint import load_state

MODEL_FILE_FORMAT = "difflab-model-file-1"  # the metadata "format" of a single-file model


def is_model_file(path: str | Path) -> bool:
    """Whether ``path`` is a single-file model (``difflab export --format safetensors``): a ``.safetensors`` file whose
    metadata names :data:`MODEL_FILE_FORMAT` (other safetensors files, e.g. saved FID references, are not)."""
    if not (str(path).endswith(".safetensors") and Path(path).is_file()):
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == MODEL_FILE_FORMAT
    except Exception:  # not readable as safetensors: not a model file (the caller says what it expected)
        return False


def model_file_tensors(model: Model) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the single self-describing file of ``model``: the network's weights under ``net.``,
    a latent model's autoencoder under ``vae.``, and the model config (JSON) in the metadata."""
    if model.config.get("format") != MODEL_FORMAT:
        raise DifflabError(f"only difflab models can be written as one file (this is a {model.config.get('format')} "
                           "model)")
    tensors = {f"net.{k}": v for k, v in model.denoiser.net.state_dict().items()}
    if isinstance(model.encoder, LatentEncoder):
        tensors.update({f"vae.{k}": v for k, v in model.encoder.autoencoder.state_dict().items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return tensors, {"format": MODEL_FILE_FORMAT, "config": json.dumps(model.config)}


def load_model_file(path: str | Path, *, weights: str = "ema", device: str | torch.device = "auto") -> Model:
    """Load the single file :func:`model_file_tensors` describes (it holds one set of weights, the exported ones)."""
    from safetensors import SafetensorError, safe_open

    if weights != "ema":
        raise DifflabError(f"{path} holds one set of weights (those it was exported with): leave --weights at ema")
    config = model_file_config(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise DifflabError(f"cannot read {path}: {e}") from None
    model = build(config)
    if not isinstance(model, Model):
        raise DifflabError(f"{path} does not hold a diffusion model")
    parts = {"net": {}, "vae": {}}
    for key, value in tensors.items():
        head, _, rest = key.partition(".")
        if head not in parts:
            raise DifflabError(f"{path}: unexpected tensor {key}")
        parts[head][rest] = value
    load_state(model.denoiser.net, parts["net"], Path(path))
    if isinstance(model.encoder, LatentEncoder):
        load_state(model.encoder.autoencoder, parts["vae"], Path(path))
    model.checkpoint = Path(path)
    model.denoiser.eval()
    return model.to(resolve_device(device))


def model_file_config(path: str | Path) -> dict:
    """The model config a single-file model holds, without reading its weights (one-line errors)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise DifflabError(f"cannot read {path}: {e}") from None
    try:
        return json.loads(meta["config"])
    except (KeyError, json.JSONDecodeError) as e:
        raise DifflabError(f"{path}: damaged model config in its metadata ({e})") from None
