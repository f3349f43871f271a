"""``difflab export``: a trained model as a diffusers pipeline folder, or as one self-describing safetensors file.

    difflab.export("runs/digits", "exported/digits", format="diffusers")   # DDPMPipeline.from_pretrained(...) loads it
    difflab.export("runs/digits", "digits.safetensors", format="safetensors")   # difflab.load("digits.safetensors")

**diffusers.** difflab's pixel U-Net is the DDPM / ADM U-Net that diffusers' ``UNet2DModel`` also implements, so
the weights map one to one, with these settings (each checked, or the export is refused with the reason):

    time embedding     sinusoid [sin, cos], frequencies 10000^(-i / (half - 1))  ->  flip_sin_to_cos=False, freq_shift=1
    FiLM / additive    ResBlock scale_shift                                      ->  resnet_time_scale_shift
    GroupNorm          gcd(groups, channels) groups, eps 1e-5                    ->  norm_num_groups (must divide every
                                                                                     channel count), norm_eps=1e-5,
                                                                                     attn_norm_num_groups (the middle
                                                                                     attention keeps its norm)
    attention heads    num_heads everywhere                                      ->  attention_head_dim (one head size:
                                                                                     equal widths where attention runs,
                                                                                     or one head)
    qkv (one Linear)   rows [q; k; v]                                            ->  to_q, to_k, to_v
    class embedding    num_classes + 1 rows, the last is the null class          ->  num_class_embeds = num_classes + 1

The scheduler is a ``DDPMScheduler`` with the model's betas and prediction type. ``difflab.json`` keeps the difflab
config (class names, data), so loading the folder back into difflab restores them. Refused: EDM and consistency
models (continuous sigma: no DDPMScheduler), latent and text models (their U-Net has difflab's spatial
transformer, which is not diffusers' layout), and anything the checks above reject. After mapping, the diffusers
U-Net is run against difflab's on random inputs; the export is refused unless they agree to float32 precision --
diffusers itself would only warn about re-initialised weights.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import tempfile
from pathlib import Path

import torch

from difflab.denoisers import VPParameterization
from difflab.diffusers_io import DIFFLAB_FILE, scheduler_config
from difflab.encoders import PixelEncoder
from difflab.errors import DifflabError
from difflab.extras import require
from difflab.model_file import model_file_tensors
from difflab.models import MODEL_FORMAT, Model, load_model
from difflab.nn import UNetConfig
from difflab.training.checkpoint import atomic_folder

FORMATS = ("diffusers", "safetensors")
NORM_EPS = 1e-5  # torch's GroupNorm default, which every difflab U-Net norm uses


def unet2d_config(c: UNetConfig) -> dict:
    """The diffusers ``UNet2DModel`` config that reproduces a difflab U-Net (module doc), or a one-line refusal."""
    if c.context_dim is not None:
        raise DifflabError("a text-conditional U-Net (cross-attention) has no diffusers UNet2DModel equivalent")
    widths = [c.base_channels * m for m in c.channel_mult]
    attn = [r in c.attn_resolutions for r in c.resolutions]
    # every GroupNorm input: level widths, the ResBlock inputs of the up path (h concatenated with a skip)
    skips, channels = [widths[0]], set(widths)
    for i, w in enumerate(widths):
        skips += [w] * c.num_blocks + ([w] if i < len(widths) - 1 else [])
    ch = widths[-1]
    for i, w in reversed(list(enumerate(widths))):
        for _ in range(c.num_blocks + 1):
            channels.add(ch + skips.pop())
            ch = w
    bad = sorted(ch for ch in channels if ch % c.groups)
    if bad:
        raise DifflabError(f"GroupNorm groups={c.groups} do not divide the {bad[0]} channels of one of its layers: "
                           f"difflab then uses gcd(groups, channels) = {math.gcd(c.groups, bad[0])} groups there, "
                           "diffusers' UNet2DModel one group count everywhere")
    head_dims = {w // c.num_heads for w, a in zip(widths, attn) if a} | {widths[-1] // c.num_heads}
    if c.num_heads > 1 and len(head_dims) > 1:
        raise DifflabError(f"{c.num_heads} attention heads over different widths give head sizes {sorted(head_dims)}; "
                           "diffusers' UNet2DModel has one head size (attention_head_dim) for every block")
    return {
        "_class_name": "UNet2DModel", "sample_size": c.image_size, "in_channels": c.in_channels,
        "out_channels": c.out_channels or c.in_channels, "center_input_sample": False,
        "time_embedding_type": "positional", "flip_sin_to_cos": False, "freq_shift": 1,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "mid_block_type": "UNetMidBlock2D", "block_out_channels": widths, "layers_per_block": c.num_blocks,
        "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv",
        "dropout": c.dropout, "act_fn": "silu", "attention_head_dim": None if c.num_heads == 1 else head_dims.pop(),
        "norm_num_groups": c.groups, "attn_norm_num_groups": c.groups, "norm_eps": NORM_EPS,
        "resnet_time_scale_shift": "scale_shift" if c.scale_shift else "default", "add_attention": True,
        "class_embed_type": None, "num_class_embeds": None if c.num_classes is None else c.num_classes + 1,
    }


# difflab key -> diffusers key, for everything but the fused qkv (split below)
RENAMES = [
    (r"^time_mlp\.0\.", "time_embedding.linear_1."), (r"^time_mlp\.2\.", "time_embedding.linear_2."),
    (r"^class_embed\.", "class_embedding."), (r"^norm_out\.", "conv_norm_out."),
    (r"^mid_block1\.", "mid_block.resnets.0."), (r"^mid_block2\.", "mid_block.resnets.1."),
    (r"^mid_attn\.", "mid_block.attentions.0."),
    (r"^down\.(\d+)\.blocks\.", r"down_blocks.\1.resnets."), (r"^down\.(\d+)\.attns\.", r"down_blocks.\1.attentions."),
    (r"^down\.(\d+)\.resample\.", r"down_blocks.\1.downsamplers.0."),
    (r"^up\.(\d+)\.blocks\.", r"up_blocks.\1.resnets."), (r"^up\.(\d+)\.attns\.", r"up_blocks.\1.attentions."),
    (r"^up\.(\d+)\.resample\.", r"up_blocks.\1.upsamplers.0."),
    (r"\.emb_proj\.", ".time_emb_proj."), (r"\.skip\.", ".conv_shortcut."),
    (r"(attentions\.\d+)\.norm\.", r"\1.group_norm."), (r"(attentions\.\d+)\.proj\.", r"\1.to_out.0."),
]


def unet2d_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """difflab U-Net weights renamed (and qkv split) into a diffusers ``UNet2DModel``'s state dict."""
    out = {}
    for key, value in state.items():
        for pattern, replacement in RENAMES:
            key = re.sub(pattern, replacement, key)
        if re.search(r"attentions\.\d+\.qkv\.", key):
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):  # rows [q; k; v]
                out[key.replace("qkv", name)] = part.contiguous()
        else:
            out[key] = value
    return out


def _check_exportable(model: Model) -> None:
    if model.config.get("format") != MODEL_FORMAT:
        raise DifflabError(f"'{model.checkpoint}' is already a {model.config.get('format')} model")
    param = model.parameterization
    if not isinstance(param, VPParameterization):
        raise DifflabError(f"a {param.kind} model has continuous noise levels, which diffusers' DDPMScheduler "
                           "(discrete timesteps) cannot drive: only VP (DDPM-style) models export to diffusers")
    if not isinstance(model.encoder, PixelEncoder):
        raise DifflabError("a latent model exports to diffusers only as a whole Stable Diffusion layout, which its "
                           "U-Net (difflab's spatial transformer) does not have: use --format safetensors")
    if model.takes_prompts:
        raise DifflabError("a text-to-image model's U-Net (difflab's spatial transformer) has no diffusers "
                           "UNet2DModel equivalent: use --format safetensors")


def export_diffusers(model: Model, out: str | Path) -> Path:
    """Write ``model`` as a diffusers ``DDPMPipeline`` folder (module doc); refuses what does not map."""
    diffusers = require("diffusers", extra="diffusers", feature="difflab export --format diffusers")
    _check_exportable(model)
    net = model.denoiser.net
    config = unet2d_config(net.config)
    state = unet2d_state({k: v.detach().float().cpu() for k, v in net.state_dict().items()})
    unet = diffusers.UNet2DModel.from_config({k: v for k, v in config.items() if k != "_class_name"})
    theirs = unet.state_dict()
    missing, extra = sorted(set(theirs) - set(state)), sorted(set(state) - set(theirs))
    shapes = [k for k in set(theirs) & set(state) if theirs[k].shape != state[k].shape]
    if missing or extra or shapes:
        first = (missing or extra or shapes)[0]
        raise DifflabError(f"the weights do not map onto diffusers' UNet2DModel ({len(missing)} missing, {len(extra)} "
                           f"unmapped, {len(shapes)} of another shape; first: {first})")
    unet.load_state_dict(state, strict=True)
    _check_same_function(copy.deepcopy(net).float().cpu(), unet.eval(), model.parameterization)
    scheduler = diffusers.DDPMScheduler.from_config(scheduler_config(model.parameterization))
    pipeline = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)

    def write(folder: Path) -> None:
        pipeline.save_pretrained(str(folder), safe_serialization=True)
        (folder / DIFFLAB_FILE).write_text(json.dumps(model.config, indent=2))

    return _atomic_folder(Path(out), write)


@torch.no_grad()
def _check_same_function(net, unet, param: VPParameterization) -> None:
    """Both networks on the same random inputs, at a low, middle and high noise level, with the first class, the
    last class and the null class (class-conditional models)."""
    g = torch.Generator().manual_seed(0)
    c = net.config
    x = torch.randn(3, c.in_channels, c.image_size, c.image_size, generator=g)
    t = torch.tensor([0.0, param.schedule.T / 2, param.schedule.T - 1])
    labels = None if c.num_classes is None else torch.tensor([0, c.num_classes, c.num_classes - 1])
    ours = net.eval()(x, t, labels)  # a copy: the caller's model keeps its mode, device and dtype
    theirs = unet(x, t, class_labels=labels).sample
    scale = max(1.0, float(ours.abs().max()))
    error = float((ours - theirs).abs().max())
    if not error <= 1e-4 * scale:
        raise DifflabError(f"the diffusers UNet2DModel built from this model does not reproduce it (max difference "
                           f"{error:.3g}); this is a difflab bug, please report it with the run's config.json")


def export_file(model: Model, out: str | Path) -> Path:
    """Write ``model`` as one ``.safetensors`` file: its weights plus its config in the metadata."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        raise DifflabError(f"a safetensors export needs a file name ending in .safetensors, got '{out}'")
    if out.exists():
        raise DifflabError(f"'{out}' exists: choose another name or remove it")
    tensors, metadata = model_file_tensors(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private; the export is for others to load too
        os.replace(tmp, out)
    except OSError as e:
        raise DifflabError(f"cannot write '{out}': {e.strerror}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _atomic_folder(out: Path, write) -> Path:
    """Refuse a non-empty ``out``, then make it atomically (:func:`~difflab.training.checkpoint.atomic_folder`)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DifflabError(f"'{out}' exists and is not empty: choose another folder or remove it")
    atomic_folder(out, write, tmp=out.with_name(f".tmp-{out.name}"))
    return out


def export(model: Model | str | Path, out: str | Path, *, format: str = "diffusers", weights: str = "ema") -> Path:
    """Export a run, checkpoint or loaded :class:`Model` (``weights``: ema or model) as ``format`` (module doc)."""
    if format not in FORMATS:
        raise DifflabError(f"unknown export format '{format}' (choose from {', '.join(FORMATS)})")
    if not isinstance(model, Model):
        model = load_model(model, weights=weights, device="cpu")
    return export_diffusers(model, out) if format == "diffusers" else export_file(model, out)

