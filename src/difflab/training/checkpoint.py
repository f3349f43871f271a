"""Checkpoints: safetensors weights plus JSON, written atomically; never pickles.

A checkpoint is a folder ``checkpoints/step_NNNNNNN/`` holding

    model.safetensors   the raw network weights
    ema.safetensors     the exponential moving average of the weights (used for sampling)
    ema_*.safetensors   further moving averages, when a task keeps more than one
    state.safetensors   optimizer moments and random-number-generator states (tensors only)
    state.json          step counter, optimizer hyperparameters, anything else that is not a tensor
    config.json         everything needed to rebuild the model (network config, parameterization, encoder,
                        conditioner, data shape; see difflab.models)

It is written to a temporary folder next to its final place, flushed, then renamed, so a crash mid-write
never leaves a half checkpoint under a name that :func:`latest_valid_checkpoint` would pick. Before writing,
the free disk space is checked; a write that fails anyway (disk full, I/O error) removes its temporary folder
and raises :class:`CheckpointWriteError`, and older checkpoints are pruned only once the new one is complete,
so a failed save never costs a checkpoint that was already on disk.

Every file offered as a checkpoint is read with safetensors or JSON, never unpickled: a ``.pt`` / ``.ckpt``
pickle (or a pickle renamed to ``model.safetensors``) is refused before a byte of it is interpreted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file, save_file

from difflab.errors import DifflabError

CHECKPOINT_RE = re.compile(r"^step_(\d+)$")
REQUIRED_FILES = ("model.safetensors", "ema.safetensors", "config.json")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
SPACE_MARGIN = (0.10, 1 << 20)  # free space needed beyond the tensors: 10% plus 1 MiB (JSON, file-system overhead)


class CheckpointWriteError(DifflabError):
    """A checkpoint could not be written (too little disk space, an I/O error); nothing older was touched."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _human(nbytes: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024


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
    # the settings of a group come back; how the step is computed (fused, foreach, ...) stays this optimizer's
    groups = [{**saved, **{k: now[k] for k in IMPLEMENTATION if k in now}}
              for saved, now in zip(meta["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")  # optimizer flags that are not settings


def checkpoint_nbytes(*tensor_dicts: dict[str, torch.Tensor]) -> int:
    """Bytes the tensors take on disk as safetensors (their data; headers and JSON are in the margin)."""
    return sum(t.numel() * t.element_size() for d in tensor_dicts for t in d.values())


def check_free_space(folder: Path, nbytes: int) -> None:
    """Raise :class:`CheckpointWriteError` unless ``folder``'s disk has room for ``nbytes`` plus a margin."""
    need = int(nbytes * (1 + SPACE_MARGIN[0])) + SPACE_MARGIN[1]
    try:
        free = shutil.disk_usage(folder).free
    except OSError:  # pragma: no cover - a file system that cannot say; the write itself will tell
        return
    if free < need:
        raise CheckpointWriteError(f"not enough disk space to write a checkpoint in {folder}: "
                                   f"needs {_human(need)}, {_human(free)} free")


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
    extra_weights: dict[str, torch.nn.Module] | None = None,
) -> Path:
    """Write ``run_dir/checkpoints/step_<step>`` atomically, then prune all but the newest ``keep``.

    Raises :class:`CheckpointWriteError` (a :class:`DifflabError`) when the disk lacks room or the write
    fails; the temporary folder is removed and every earlier checkpoint is left as it was, so a training
    loop can warn and carry on. ``keep`` counts the new checkpoint; only checkpoints of earlier steps
    are pruned, and only after the new one is complete (``keep <= 0`` keeps everything). ``extra_weights``
    are further modules saved as ``<name>.safetensors`` (e.g. ``ema_target``)."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}"
    files = {
        "model.safetensors": model.state_dict(),
        "ema.safetensors": ema.state_dict(),
        "state.safetensors": state_tensors,
        **{f"{name}.safetensors": module.state_dict() for name, module in (extra_weights or {}).items()},
    }
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_leftovers(run_dir)  # of a crash; only the process that holds the run's lock writes checkpoints
    except OSError as e:
        raise CheckpointWriteError(f"cannot write a checkpoint in {root}: {_first_line(e)}") from None
    check_free_space(root, checkpoint_nbytes(*files.values()))
    write_folder(final, files, {"state.json": {"step": step, **state_json}, "config.json": config}, tmp=tmp)
    if keep > 0:
        older = [p for p in list_checkpoints(run_dir) if checkpoint_step(p) < step]
        for old in older[: max(0, len(older) - (keep - 1))]:
            _remove_folder(old)
    return final


def write_folder(final: Path, files: dict[str, dict[str, torch.Tensor]], jsons: dict[str, object], *,
                 tmp: Path | None = None) -> None:
    """Write safetensors ``files`` (name -> tensors) and JSON files into ``final`` atomically (:func:`atomic_folder`).
    Raises :class:`CheckpointWriteError`; a failed write leaves nothing behind."""

    def write(folder: Path) -> None:
        for name, tensors in files.items():  # one file on the CPU at a time
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, folder / name)
        for name, obj in jsons.items():
            write_json(folder / name, obj)

    atomic_folder(final, write, tmp=tmp)


def atomic_folder(final: Path, write, *, tmp: Path | None = None) -> None:
    """Make the folder ``final`` atomically: ``write(folder)`` fills a temporary sibling, every file in it is flushed,
    then it is renamed into place (an existing ``final`` is replaced only once the new one is complete). Raises
    :class:`CheckpointWriteError`; a failed write (a full disk, an I/O error, Ctrl-C) leaves nothing behind."""
    tmp = tmp or final.with_name(f".tmp-{final.name}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # what a killed writer left
            shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
        for f in sorted(tmp.rglob("*"), key=lambda p: len(p.parts), reverse=True):  # files, then their folders
            if f.is_file():  # flush the weights too before the rename makes the folder visible
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
            else:
                _fsync_dir(f)
        _fsync_dir(tmp)
        _replace_folder(tmp, final)
    except BaseException as e:  # never leave a half folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, Exception):
            raise
        raise CheckpointWriteError(f"could not write {final}: {_first_line(e)}") from e
    try:
        _fsync_dir(final.parent)
    except OSError:  # the folder is complete; only its survival of a power cut is less certain
        pass


def _remove_folder(folder: Path) -> None:
    """Delete a checkpoint folder: renamed out of sight first (one atomic step), so a process killed while it
    deletes leaves a ``.pruned-*`` folder that :func:`remove_leftovers` finishes, never a half ``step_*``."""
    gone = folder.with_name(f".pruned-{folder.name}")
    try:
        os.replace(folder, gone)
    except OSError:
        return
    shutil.rmtree(gone, ignore_errors=True)


def restore_set_aside(run_dir: Path) -> None:
    """Put back a checkpoint that was set aside to be replaced (``.old-step_N``) when its replacement never
    arrived (the writer was killed between the two renames): it is then the only copy of step N."""
    root = Path(run_dir) / "checkpoints"
    for aside in root.glob(".old-step_*") if root.is_dir() else ():
        if aside.is_dir() and not (root / aside.name[len(".old-"):]).exists():
            os.replace(aside, root / aside.name[len(".old-"):])


def remove_leftovers(run_dir: Path) -> None:
    """Finish what a killed writer left in ``checkpoints/``: temporary (``.tmp-``), half-pruned (``.pruned-``) and
    replaced (``.old-``, once restored by :func:`restore_set_aside` where needed) folders go. Only the process that
    holds the run's lock may call this, and only once a checkpoint has been restored or written."""
    restore_set_aside(run_dir)
    root = Path(run_dir) / "checkpoints"
    for entry in root.iterdir() if root.is_dir() else ():
        if entry.is_dir() and entry.name.startswith((".tmp-step_", ".pruned-", ".old-")):
            shutil.rmtree(entry, ignore_errors=True)


def _replace_folder(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` is set aside first and restored if the rename fails."""
    if not dst.exists():
        os.replace(src, dst)
        return
    aside = dst.with_name(f".old-{dst.name}")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(dst, aside)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(aside, dst)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def checkpoint_step(checkpoint: Path) -> int:
    """The training step of a ``step_NNNNNNN`` checkpoint folder."""
    return int(CHECKPOINT_RE.match(Path(checkpoint).name).group(1))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are never listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    found = [p for p in found if all((p / f).is_file() for f in REQUIRED_FILES)]
    return sorted(found, key=checkpoint_step)


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (-> its newest checkpoint) or a checkpoint folder -> a checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise DifflabError(f"no run or checkpoint at '{path}'")
    if not path.is_dir():
        if path.suffix.lower() in PICKLE_SUFFIXES or _sniff(path) == "pickle":
            raise DifflabError(f"'{path}' is a file, not a difflab checkpoint folder; difflab never loads pickles "
                               "(give a run folder or a checkpoint folder with safetensors weights)")
        raise DifflabError(f"'{path}' is a file, not a difflab run or checkpoint folder")
    if all((path / f).is_file() for f in REQUIRED_FILES):
        return path
    found = list_checkpoints(path)
    if not found:
        raise DifflabError(f"'{path}' holds no checkpoint (expected a run folder with checkpoints/step_*/ or a checkpoint folder)")
    return found[-1]


def read_config(checkpoint: Path) -> dict:
    try:
        return json.loads((Path(checkpoint) / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DifflabError(f"cannot read {Path(checkpoint) / 'config.json'}: {_first_line(e)}") from None


def _sniff(path: Path) -> str:
    """'safetensors', 'pickle' (a raw pickle or PyTorch's zip of pickles) or 'other', from the first bytes.

    A safetensors file opens with an 8-byte little-endian header length N (which fits in the file) and then the
    JSON header ``{``; a pickle opens with the PROTO opcode 0x80 (protocol 2+), a ``torch.save`` file with a zip
    signature. The safetensors test comes first: a header of 128 bytes also starts with the byte 0x80."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return "other"
    return _sniff_head(head, size)


def _sniff_head(head: bytes, size: int) -> str:
    """:func:`_sniff` of a file's first 9 bytes and its size."""
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":
        return "pickle"
    return "other"


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a pickle under any name is refused unread (one-line :class:`DifflabError`)."""
    path = Path(path)
    if _sniff(path) == "pickle":
        raise DifflabError(f"{path} is a pickle, not safetensors; difflab never loads pickles")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises several types for damaged files
        raise DifflabError(f"cannot read {path}: {_first_line(e)}") from None


def load_weights(checkpoint: Path, which: str = "ema") -> dict[str, torch.Tensor]:
    """Load ``model``, ``ema`` (or a further ``ema_*``) weights from a checkpoint folder."""
    if which not in ("model", "ema") and not which.startswith("ema_"):
        raise DifflabError(f"weights must be 'ema' or 'model', got '{which}'")
    path = Path(checkpoint) / f"{which}.safetensors"
    if not path.is_file():
        raise DifflabError(f"checkpoint {checkpoint} has no {path.name} (written by a task that kept other weights?)")
    return load_tensors(path)


def read_model_files(checkpoint: Path, weights: str = "ema", extra: tuple[str, ...] = ()
                     ) -> tuple[dict, dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(config.json, weights, further weights) of a checkpoint folder -- ``extra`` names further
    ``<name>.safetensors`` files read when present (a latent model's ``vae``) -- every file opened before any is
    read: a run that is still training may prune the checkpoint meanwhile, and an open file outlives its deletion
    (POSIX), so what is read is one consistent checkpoint or a one-line error, never half of one."""
    checkpoint = Path(checkpoint)
    if weights not in ("model", "ema") and not weights.startswith("ema_"):
        raise DifflabError(f"weights must be 'ema' or 'model', got '{weights}'")
    paths = {"config": checkpoint / "config.json", weights: checkpoint / f"{weights}.safetensors",
             **{name: checkpoint / f"{name}.safetensors" for name in extra
                if (checkpoint / f"{name}.safetensors").is_file()}}
    try:
        with contextlib.ExitStack() as stack:
            files = {name: stack.enter_context(open(path, "rb")) for name, path in paths.items()}
            data = {name: f.read() for name, f in files.items()}
    except OSError as e:
        raise DifflabError(f"cannot read {e.filename or checkpoint}: {e.strerror}") from None
    try:
        config = json.loads(data.pop("config"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DifflabError(f"cannot read {paths['config']}: {_first_line(e)}") from None
    tensors = {}
    for name, raw in data.items():
        if _sniff_head(raw[:9], len(raw)) == "pickle":
            raise DifflabError(f"{paths[name]} is a pickle, not safetensors; difflab never loads pickles")
        try:
            tensors[name] = load_safetensors_bytes(raw)
        except Exception as e:  # safetensors raises several types for damaged files
            raise DifflabError(f"cannot read {paths[name]}: {_first_line(e)}") from None
    main = tensors.pop(weights)
    return config, main, tensors


def load_training_state(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer / RNG tensors and the ``state.json`` of a checkpoint folder."""
    tensors = load_tensors(Path(checkpoint) / "state.safetensors")
    try:
        meta = json.loads((Path(checkpoint) / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DifflabError(f"cannot read the training state in {checkpoint}: {_first_line(e)}") from None
    return tensors, meta


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """Every ``checkpoints/step_*`` folder of a run, complete or not, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)), key=checkpoint_step)


def checkpoint_problem(checkpoint: Path, *, training_state: bool = True) -> str | None:
    """What is wrong with a checkpoint folder (a missing, truncated or pickled file, a state.json without its
    step counter, a config.json that is no JSON object), or None when every file reads back. Without
    ``training_state`` only what loading the model needs is checked (weights and config.json)."""
    checkpoint = Path(checkpoint)
    needed = {"model.safetensors", "ema.safetensors"} | ({"state.safetensors"} if training_state else set())
    missing = sorted(f for f in (*needed, "config.json", *(("state.json",) if training_state else ()))
                     if not (checkpoint / f).is_file())
    if missing:
        return f"missing {', '.join(missing)}"
    for name in sorted(needed | {p.name for p in checkpoint.glob("*.safetensors")}):
        if _sniff(checkpoint / name) == "pickle":
            return f"{name} is a pickle, not safetensors; difflab never loads pickles"
        try:
            with safe_open(str(checkpoint / name), framework="pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises several types for damaged files
            return f"{name}: {_first_line(e)}"
    try:
        if training_state:
            state = json.loads((checkpoint / "state.json").read_text())
            if not isinstance(state, dict) or not isinstance(state.get("step"), int):
                return "state.json lacks the step counter"
        if not isinstance(json.loads((checkpoint / "config.json").read_text()), dict):
            return "config.json is not a JSON object"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{'state.json or config.json' if training_state else 'config.json'}: {_first_line(e)}"
    return None


def warn_damaged(checkpoint: Path, problem: str) -> None:
    print(f"warning: skipping damaged checkpoint {checkpoint}: {problem}")


def latest_valid_checkpoint(run_dir: Path, *, report=warn_damaged) -> Path | None:
    """The newest checkpoint whose files all read back; damaged ones are skipped and passed to ``report``
    (checkpoint, problem) -- by default a warning."""
    for checkpoint in reversed(checkpoint_folders(run_dir)):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        report(checkpoint, problem)
    return None


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], where: Path | str) -> None:
    """``module.load_state_dict(state)``, strictly, with a one-line error when the weights in ``where`` do not
    fit the module that its config describes (missing, unexpected or differently shaped tensors)."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        detail = lines[0] if lines else "shapes or names differ"
        raise DifflabError(f"the weights in {where} do not match the model its config describes "
                           f"({len(lines)} problem(s), first: {detail[:200]})") from None
