"""Checkpoints: safetensors weights plus JSON, written atomically; never pickles.

A checkpoint is a folder ``checkpoints/step_NNNNNNN/`` holding

    model.safetensors   the raw network weights
    ema.safetensors     the exponential moving average of the weights (used for sampling)
    state.safetensors   optimizer moments and random-number-generator states (tensors only)
    state.json          step counter, optimizer hyperparameters, anything else that is not a tensor
    config.json         everything needed to rebuild the model (network config, schedule, prediction, data shape)

It is written to a temporary folder next to its final place, flushed, then renamed, so a crash mid-write
never leaves a half checkpoint under a name that :func:`latest_checkpoint` would pick.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from difflab.errors import DifflabError

CHECKPOINT_RE = re.compile(r"^step_(\d+)$")
REQUIRED_FILES = ("model.safetensors", "ema.safetensors", "config.json")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON (hyperparameters, scalars)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    config: dict,
    state_tensors: dict[str, torch.Tensor],
    state_json: dict,
    keep: int = 3,
) -> Path:
    """Write ``run_dir/checkpoints/step_<step>`` atomically; then prune all but the newest ``keep``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}, tmp / "ema.safetensors")
    save_file({k: v.detach().cpu().contiguous() for k, v in state_tensors.items()}, tmp / "state.safetensors")
    write_json(tmp / "state.json", {"step": step, **state_json})
    write_json(tmp / "config.json", config)
    for f in tmp.iterdir():  # flush the weights too before the rename makes the checkpoint visible
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are never listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    found = [p for p in found if all((p / f).is_file() for f in REQUIRED_FILES)]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (-> its newest checkpoint) or a checkpoint folder -> a checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise DifflabError(f"no run or checkpoint at '{path}'")
    if all((path / f).is_file() for f in REQUIRED_FILES):
        return path
    found = list_checkpoints(path)
    if not found:
        raise DifflabError(f"'{path}' holds no checkpoint (expected a run folder with checkpoints/step_*/ or a checkpoint folder)")
    return found[-1]


def read_config(checkpoint: Path) -> dict:
    try:
        return json.loads((Path(checkpoint) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DifflabError(f"cannot read {Path(checkpoint) / 'config.json'}: {e}") from None


def load_weights(checkpoint: Path, which: str = "ema") -> dict[str, torch.Tensor]:
    """Load ``model`` or ``ema`` weights from a checkpoint folder."""
    if which not in ("model", "ema"):
        raise DifflabError(f"weights must be 'ema' or 'model', got '{which}'")
    try:
        return load_file(Path(checkpoint) / f"{which}.safetensors")
    except Exception as e:  # safetensors raises several types for damaged files
        raise DifflabError(f"cannot read {Path(checkpoint) / f'{which}.safetensors'}: {e}") from None


def load_training_state(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        tensors = load_file(Path(checkpoint) / "state.safetensors")
        meta = json.loads((Path(checkpoint) / "state.json").read_text())
    except Exception as e:
        raise DifflabError(f"cannot read the training state in {checkpoint}: {e}") from None
    return tensors, meta


def latest_valid_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose files all read back; damaged ones are reported and skipped."""
    from safetensors import safe_open

    for checkpoint in reversed(list_checkpoints(run_dir)):
        try:
            for name in ("model.safetensors", "ema.safetensors", "state.safetensors"):
                with safe_open(str(checkpoint / name), framework="pt") as f:
                    f.keys()
            json.loads((checkpoint / "state.json").read_text())
            json.loads((checkpoint / "config.json").read_text())
            return checkpoint
        except Exception as e:
            print(f"warning: skipping damaged checkpoint {checkpoint}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return None
