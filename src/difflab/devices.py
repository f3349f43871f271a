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


def autocast(device: torch.device, precision: str = "auto"):
    """The mixed-precision rule. ``auto``: bf16 autocast on a GPU (networks run in bf16, sampler and loss arithmetic
    stay float32), nothing on a CPU, where bf16 convolutions are slower than float32; ``bf16``: autocast on any device
    (a CPU too: how the tests compare the two); ``fp32``: nothing."""
    device = torch.device(device)
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, torch.bfloat16)
    return nullcontext()


def memory_format(device: torch.device) -> torch.memory_format:
    """Channels-last on a GPU (tensor-core convolutions are NHWC); NCHW on a CPU, where channels-last measured no
    faster on 2 cores (training step forward + backward, benchmarks/speed.py's networks: within this machine's +-10%
    noise for the tiny and small presets at 16-32 px, in repeated runs either way; no faster at 8 px)."""
    return torch.channels_last if torch.device(device).type == "cuda" else torch.contiguous_format


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a host tensor bound for a GPU goes through pinned memory without blocking the host."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def compile_module(module: torch.nn.Module, *, asked: bool) -> torch.nn.Module:
    """``torch.compile(module)``. When compilation was not ``asked`` for but is a default (a GPU's training step, a
    long sampling job), a part that torch cannot compile runs eagerly with torch's warning (dynamo's
    ``suppress_errors``) instead of stopping the work: a default must never make a run fail that eager would finish."""
    if not asked:
        from torch import _dynamo

        _dynamo.config.suppress_errors = True
    return torch.compile(module)
