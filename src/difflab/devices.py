"""Where the work runs: resolving a device name, the one mixed-precision rule and the one memory-format rule."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from difflab.errors import DifflabError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda when a GPU is visible, else cpu; any other name is checked (one-line errors)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise DifflabError(f"unknown device '{device}' (use cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DifflabError("--device cuda was asked for but PyTorch sees no CUDA GPU (use --device cpu)")
    return device


def autocast(device: torch.device):
    """bf16 autocast on a GPU (networks run in bf16, sampler and loss arithmetic stay float32); nothing on a CPU,
    where bf16 matmuls are slower than float32 and would change results."""
    return torch.autocast("cuda", torch.bfloat16) if torch.device(device).type == "cuda" else nullcontext()


CPU_CHANNELS_LAST_FROM = 16  # px: below it NHWC convolutions lose on CPU, from it they win (benchmarks/speed.py)


def memory_format(device: torch.device, image_size: int | None) -> torch.memory_format:
    """Channels-last where it pays: always on a GPU (tensor-core convolutions are NHWC); on a CPU for feature maps of
    16 px and up. Measured on 2 cores, training step (forward + backward): the small preset at 28 px is 11% faster
    channels-last, the tiny one at 8 px 8% slower."""
    if torch.device(device).type == "cuda":
        return torch.channels_last
    if torch.device(device).type == "cpu" and image_size is not None and image_size >= CPU_CHANNELS_LAST_FROM:
        return torch.channels_last
    return torch.contiguous_format
