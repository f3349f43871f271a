"""Checkpoints never lose work: a failed or impossible write keeps every older checkpoint, damaged ones are
skipped on resume, pruning waits for the new checkpoint, and pickles are refused without being run."""

from __future__ import annotations

import errno
import os
import pickle
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from torch import nn

import difflab.training.checkpoint as ckpt
from difflab.denoisers import VPParameterization
from difflab.errors import DifflabError
from difflab.models import load_model, model_config
from difflab.nn import unet_config
from difflab.schedules import make_schedule
from difflab.training.checkpoint import (
    CheckpointWriteError,
    latest_valid_checkpoint,
    list_checkpoints,
    load_tensors,
    load_training_state,
    load_weights,
    resolve_checkpoint,
    save_checkpoint,
    write_json,
)


def save(run: Path, step: int, keep: int = 3) -> Path:
    """A checkpoint of tiny modules whose weights encode the step, so a test can tell which one it read."""
    model, ema = nn.Linear(3, 2), nn.Linear(3, 2)
    with torch.no_grad():
        for p in [*model.parameters(), *ema.parameters()]:
            p.fill_(float(step))
    return save_checkpoint(run, step, model=model, ema=ema, config={"format": "test"},
                           state_tensors={"rng": torch.arange(4)}, state_json={"lr": 0.1}, keep=keep)


def names(run: Path) -> list[str]:
    return [p.name for p in list_checkpoints(run)]


def assert_intact(checkpoint: Path, step: int) -> None:
    assert torch.equal(load_weights(checkpoint, "model")["weight"], torch.full((2, 3), float(step)))
    assert torch.equal(load_weights(checkpoint, "ema")["bias"], torch.full((2,), float(step)))
    tensors, meta = load_training_state(checkpoint)
    assert torch.equal(tensors["rng"], torch.arange(4)) and meta == {"step": step, "lr": 0.1}


def no_temporary_folders(run: Path) -> bool:
    return not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


# --- (a) a write that fails halfway -----------------------------------------------------------------------

def test_writer_failing_halfway_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    save(tmp_path, 10)
    real_save_file, calls = ckpt.save_file, []

    def disk_fills_up(tensors, filename):
        calls.append(filename)
        if len(calls) == 2:  # the EMA weights: half a file reaches the disk, then the disk is full
            Path(filename).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"ha")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save_file(tensors, filename)

    monkeypatch.setattr(ckpt, "save_file", disk_fills_up)
    with pytest.raises(CheckpointWriteError, match="step_0000020.*No space left on device") as info:
        save(tmp_path, 20, keep=1)  # keep=1 would prune step 10 if the new one had been written
    assert "\n" not in str(info.value) and isinstance(info.value, DifflabError)
    assert len(calls) == 2 and no_temporary_folders(tmp_path)
    assert names(tmp_path) == ["step_0000010"]
    assert latest_valid_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_0000010"
    assert_intact(tmp_path / "checkpoints" / "step_0000010", 10)
    assert "warning" not in capsys.readouterr().out  # nothing damaged was ever visible

    monkeypatch.setattr(ckpt, "save_file", real_save_file)  # the disk has room again: training goes on
    save(tmp_path, 30, keep=2)
    assert names(tmp_path) == ["step_0000010", "step_0000030"]


def test_failed_rewrite_of_the_same_step_restores_the_old_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 10)
    real_replace = os.replace

    def rename_fails(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise OSError(errno.EIO, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", rename_fails)
    with pytest.raises(CheckpointWriteError, match="Input/output error"):
        save(tmp_path, 10)
    monkeypatch.undo()
    assert names(tmp_path) == ["step_0000010"] and no_temporary_folders(tmp_path)
    assert_intact(tmp_path / "checkpoints" / "step_0000010", 10)


def test_interrupt_during_write_removes_the_temporary_folder_and_propagates(tmp_path, monkeypatch):
    save(tmp_path, 10)

    def interrupted(tensors, filename):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 20)
    assert names(tmp_path) == ["step_0000010"] and no_temporary_folders(tmp_path)


def test_leftover_temporary_folder_from_a_crash_is_cleared(tmp_path):
    save(tmp_path, 10)
    crashed = tmp_path / "checkpoints" / ".tmp-step_0000015"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"partial")
    save(tmp_path, 20)
    assert not crashed.exists() and names(tmp_path) == ["step_0000010", "step_0000020"]


# --- (b) a full disk, found before writing ------------------------------------------------------------------

def test_full_disk_is_refused_before_writing(tmp_path, monkeypatch):
    save(tmp_path, 10)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage(10 << 30, (10 << 30) - 5000, 5000))
    monkeypatch.setattr(ckpt, "save_file", lambda *a: pytest.fail("wrote although the disk is full"))
    with pytest.raises(CheckpointWriteError) as info:
        save(tmp_path, 20, keep=1)
    message = str(info.value)
    assert "\n" not in message and "not enough disk space" in message
    assert str(tmp_path / "checkpoints") in message and "1.0 MiB" in message and "4.9 KiB free" in message
    assert names(tmp_path) == ["step_0000010"] and no_temporary_folders(tmp_path)
    assert_intact(tmp_path / "checkpoints" / "step_0000010", 10)


def test_space_estimate_counts_every_tensor():
    model = nn.Linear(10, 10)  # 110 float32 parameters
    assert ckpt.checkpoint_nbytes(model.state_dict(), model.state_dict(), {"m": torch.zeros(5, dtype=torch.float64)}) \
        == 2 * 110 * 4 + 5 * 8
    ckpt.check_free_space(Path("."), 1000)  # this disk has room for a kilobyte
    with pytest.raises(CheckpointWriteError, match="not enough disk space"):
        ckpt.check_free_space(Path("."), 1 << 62)


# --- (c) damaged checkpoints are skipped on resume -----------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated weights", "garbage state.json", "missing state"])
def test_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, capsys, damage):
    save(tmp_path, 10)
    newest = save(tmp_path, 20)
    if damage == "truncated weights":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: len(data) - 7])
    elif damage == "garbage state.json":
        (newest / "state.json").write_text('{"step": 20, "lr"')
    else:
        (newest / "state.safetensors").unlink()
    assert latest_valid_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_0000010"
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("warning: skipping damaged checkpoint") and "step_0000020" in out


def test_damaged_weights_give_a_one_line_error(tmp_path):
    newest = save(tmp_path, 20)
    (newest / "ema.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(DifflabError, match="cannot read .*ema.safetensors") as info:
        load_weights(newest, "ema")
    assert "\n" not in str(info.value)
    assert latest_valid_checkpoint(tmp_path) is None


# --- (d) pruning -------------------------------------------------------------------------------------------------

def test_pruning_keeps_the_newest_and_waits_for_the_new_checkpoint(tmp_path, monkeypatch):
    for step in (10, 20, 30):
        save(tmp_path, step, keep=0)  # keep <= 0 keeps everything
    seen_during_write = []
    real_save_file = ckpt.save_file

    def watching(tensors, filename):
        seen_during_write.append(names(tmp_path))
        real_save_file(tensors, filename)

    monkeypatch.setattr(ckpt, "save_file", watching)
    save(tmp_path, 40, keep=2)
    assert all(seen == ["step_0000010", "step_0000020", "step_0000030"] for seen in seen_during_write)
    assert names(tmp_path) == ["step_0000030", "step_0000040"]
    assert_intact(tmp_path / "checkpoints" / "step_0000030", 30)


def test_pruning_never_removes_newer_steps(tmp_path):
    """Resuming from step 20 after step 30 was damaged: saving step 25 with keep=1 removes only 10 and 20."""
    for step in (10, 20, 30):
        save(tmp_path, step, keep=0)
    save(tmp_path, 25, keep=1)
    assert names(tmp_path) == ["step_0000025", "step_0000030"]


# --- (e) pickles are refused, never run ----------------------------------------------------------------------------

class Exploit:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_the_exploit_is_real(tmp_path):
    """Guard against a vacuous test below: loading the payload with pickle does create the marker."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Exploit(marker)))
    assert marker.exists()


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_disguised_as_safetensors_is_refused_unrun(tmp_path, capsys, writer):
    save(tmp_path, 10)
    evil = save(tmp_path, 20)
    marker = tmp_path / "pwned"
    for name in ("model.safetensors", "ema.safetensors"):
        if writer == "pickle":
            (evil / name).write_bytes(pickle.dumps(Exploit(marker)))
        else:
            torch.save({"weight": Exploit(marker)}, evil / name)

    assert latest_valid_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_0000010"
    assert "is a pickle" in capsys.readouterr().out
    for load in (lambda: load_weights(evil, "model"), lambda: load_weights(evil, "ema"),
                 lambda: load_tensors(evil / "model.safetensors")):
        with pytest.raises(DifflabError, match="is a pickle, not safetensors; difflab never loads pickles"):
            load()
    assert resolve_checkpoint(evil) == evil  # the folder has the right shape; its weights are what is refused
    config = model_config(unet_config("tiny", image_size=8, in_channels=1),
                          parameterization=VPParameterization(make_schedule("linear", 10)), data={"name": "test"})
    write_json(evil / "config.json", config)
    with pytest.raises(DifflabError, match="never loads pickles"):
        load_model(evil, device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt", ".safetensors"])
def test_pickle_file_given_for_a_checkpoint_folder(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"model{suffix}"
    torch.save({"state_dict": Exploit(marker)}, path)
    with pytest.raises(DifflabError, match="is a file, not a difflab checkpoint folder; difflab never loads pickles") as info:
        resolve_checkpoint(path)
    assert "\n" not in str(info.value)
    assert latest_valid_checkpoint(path) is None
    assert not marker.exists()


def test_other_file_given_for_a_checkpoint_folder(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(DifflabError, match="is a file, not a difflab run or checkpoint folder"):
        resolve_checkpoint(path)
