"""One writer per run folder, no silent restart, no stack trace: what an adversarial run found (issue 11).

Each test here failed on the code before the fix: two processes racing on one folder, all-damaged checkpoints,
damaged run configs, read-only folders, YAML numbers, a newest checkpoint damaged or pruned under a reader, a kill
while pruning, the second Ctrl-C, unquoted hints, names that escape --out, non-standard JSON in the log, and an
update that makes the weights non-finite."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from faults import break_a_weight
from safetensors.torch import load_file

import difflab
from difflab.cli import main
from difflab.errors import DifflabError
from difflab.tasks import DiffusionTask
from difflab.tasks.diffusion import DiffusionConfig
from difflab.training import loop
from difflab.training.checkpoint import checkpoint_folders, checkpoint_problem, list_checkpoints
from difflab.training.config import RunConfig, fields_of, load_config_file, make_configs
from difflab.training.lock import RunLock
from difflab.training.runs import GracefulStop

TINY = dict(batch_size=16, log_every=1, sample_every=0, num_samples=2, sample_steps=1, warmup=2,
            model={"base_channels": 16})
CLASSIFIER = dict(batch_size=16, log_every=1, sample_every=0, warmup=2, model={"base_channels": 16})
VAE = dict(batch_size=16, log_every=1, sample_every=0, warmup=2, preset="tiny-f2", num_samples=4, stats_images=64,
           model={"block_channels": [16, 32], "latent_channels": 2, "norm_groups": 8})
TASKS = {"diffusion": (DiffusionTask, TINY, "train"),
         "classifier": (difflab.tasks.NoisyClassifierTask, CLASSIFIER, "train-classifier"),
         "vae": (difflab.tasks.VAETask, VAE, "train-vae")}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A tiny diffusion run with checkpoints at steps 1 and 2 (tests copy it)."""
    out = tmp_path_factory.mktemp("base")
    return difflab.train(steps=2, checkpoint_every=1, out=str(out), name="base", progress=False, **TINY)


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy)
    return copy


def snapshot(folder: Path) -> dict:
    """Every file's bytes (the lock file aside: taking a lock writes who holds it)."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != ".lock"}


@contextlib.contextmanager
def read_only(folder: Path):
    """Make ``folder`` and everything in it unwritable, for root too (who ignores permission bits: chattr +i)."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-R", "+i", str(folder)], check=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-R", "-i", str(folder)], check=True)
    else:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
        for p, mode in modes.items():
            p.chmod(mode & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and not condition():
        time.sleep(0.2)
    assert condition(), what


def _logged_steps(run: Path) -> int:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    return max((r["step"] for r in rows), default=0)


# 1. one writer per run folder -------------------------------------------------------------------------------------

def test_a_second_writer_is_refused_and_a_killed_holder_leaves_no_lock(run, tmp_path):
    cmd = [sys.executable, "-m", "difflab", "train"]
    holder = subprocess.Popen([*cmd, "--resume", str(run), "--steps", "1000000", "--checkpoint-every", "1000000",
                               "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        _wait_for(lambda: _logged_steps(run) > 4, 120, "the first writer did not start training within 120 s")
        checkpoints, config = snapshot(run / "checkpoints"), (run / "config.json").read_bytes()
        for argv in (["--resume", str(run), "--steps", "5"],
                     ["--out", str(run.parent), "--name", run.name, "--overwrite", "--steps", "1"]):
            second = subprocess.run([*cmd, *argv, "--quiet"], capture_output=True, text=True, env=ENV, timeout=120)
            err = second.stderr.strip().splitlines()
            assert second.returncode == 2 and len(err) == 1, second.stderr
            assert "is in use" in err[0] and f"process {holder.pid} on host {socket.gethostname()}" in err[0], err
        assert snapshot(run / "checkpoints") == checkpoints and (run / "config.json").read_bytes() == config
        assert holder.poll() is None  # the first writer never noticed
    finally:
        holder.kill()  # SIGKILL: no handler runs, no lock is released by difflab
        holder.wait()
    # the operating system dropped the lock with the process: the run resumes at once
    resumed = loop.train(DiffusionTask, resume=run, steps=3, progress=False)
    assert list_checkpoints(resumed)[-1].name == "step_0000003"


def test_a_folder_in_use_is_never_overwritten_and_default_names_skip_it(run, tmp_path, one_line):
    before = snapshot(run)
    with RunLock(run):  # as if another process trained in it
        one_line(["train", "--out", str(run.parent), "--name", run.name, "--overwrite", "--quiet"],
                 "is in use", f"process {os.getpid()}")
        one_line(["train", "--resume", str(run), "--steps", "4", "--quiet"], "is in use")
    assert snapshot(run) == before
    out = tmp_path / "numbered"
    (out / "digits").mkdir(parents=True)
    with RunLock(out / "digits"):  # a run that started a moment ago and has written nothing yet
        made = difflab.train(steps=1, out=str(out), progress=False, **TINY)
    assert made == out / "digits-2"


# 2. no silent restart ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", TASKS)
def test_resume_refuses_when_every_checkpoint_is_damaged(tmp_path, one_line, task):
    task_class, settings, command = TASKS[task]
    run = loop.train(task_class, steps=2, checkpoint_every=1, out=str(tmp_path / "a folder"), name="my run",
                     progress=False, **settings)
    for state in run.glob("checkpoints/step_*/state.safetensors"):
        state.write_bytes(state.read_bytes()[:50])  # truncated
    shutil.copytree(run / "checkpoints" / "step_0000001", run / "checkpoints" / ".pruned-step_0000000")  # evidence
    before = snapshot(run)
    err = one_line([command, "--resume", str(run), "--steps", "4", "--quiet"],
                   "none of its 2 checkpoint(s) is usable", "step_0000002: state.safetensors", "--overwrite")
    assert snapshot(run) == before  # no retraining, no truncated log, no rewritten config
    # the way out it names, copied from the message (paths with spaces quoted), starts over
    argv = shlex.split(err.split("start over (deleting them) with: ", 1)[1])
    assert argv[:2] == ["difflab", command]
    assert main([*argv[1:], "--quiet"]) == 0
    assert [c.name for c in list_checkpoints(run)] == ["step_0000001", "step_0000002"]  # the run's own settings
    assert all(checkpoint_problem(c) is None for c in list_checkpoints(run))


# 3. the run's config.json ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b'{"task": "diffusion", "run": {"dataset": "dig', b"[]", b"{}", b"[1, 2]",
                                     b'{"task": "diffusion", "run": {}, "diffusion": {}}', b"\x80\x04\x95\xff\xfe"])
def test_a_damaged_run_config_is_refused_in_one_line(run, one_line, content):
    (run / "config.json").write_bytes(content)
    before = snapshot(run)
    one_line(["train", "--resume", str(run), "--steps", "4", "--quiet"], "config.json")
    assert snapshot(run) == before


# 4. one line, exit 2, nothing written -------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, fragment", [
    (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--lr", "0"], "--lr"),
    (["--lr", "1e30"], "--lr"), (["--weight-decay", "2000", "--lr", "1e-3"], "--weight-decay"),
    (["--weight-decay", "-1"], "--weight-decay"), (["--keep", "-1"], "--keep"), (["--name", "../x"], "--name"),
    (["--name", "a/b"], "--name"), (["--name", ".."], "--name")])
def test_bad_settings_are_one_line_and_write_nothing(tmp_path, one_line, flags, fragment):
    out = tmp_path / "out"
    one_line(["train", "--out", str(out), "--quiet", *flags], fragment)
    assert list(tmp_path.iterdir()) == []


def test_keep_zero_keeps_every_checkpoint(tmp_path):
    run = difflab.train(steps=3, checkpoint_every=1, keep=0, out=str(tmp_path), progress=False, **TINY)
    assert [c.name for c in list_checkpoints(run)] == ["step_0000001", "step_0000002", "step_0000003"]


def test_resume_keeps_the_run_where_it_is(run, one_line):
    before = snapshot(run)
    one_line(["train", "--resume", str(run), "--name", "elsewhere", "--quiet"], "--name", "--resume")
    one_line(["train", "--resume", str(run), "--out", str(run.parent / "other"), "--quiet"], "--out")
    assert snapshot(run) == before and not (run.parent / "other").exists()


def test_read_only_folders_are_one_line(run, tmp_path, one_line):
    locked = tmp_path / "read-only"
    locked.mkdir()
    with read_only(locked):
        one_line(["train", "--out", str(locked), "--quiet"], str(locked))
    before = snapshot(run)
    with read_only(run):
        one_line(["train", "--resume", str(run), "--steps", "4", "--quiet"], str(run))
        one_line(["sample", str(run), "-n", "1", "--steps", "2", "--quiet"], "generated", "--out")
    assert snapshot(run) == before
    assert main(["sample", str(run), "-n", "1", "--steps", "2", "--quiet", "--out", str(tmp_path / "pics")]) == 0


def test_damaged_checkpoint_json_and_config_files(run, tmp_path, capsys, one_line):
    # state.json of {} in the newest checkpoint: resume falls back to the older one, says so, and goes on
    (run / "checkpoints" / "step_0000002" / "state.json").write_text("{}")
    assert main(["train", "--resume", str(run), "--steps", "3", "--quiet"]) == 0
    assert "step_0000002: state.json lacks the step counter" in capsys.readouterr().out
    # a checkpoint config.json of [1, 2]: sample falls back past it; given alone, one line
    newest = list_checkpoints(run)[-1]
    (newest / "config.json").write_text("[1, 2]")
    assert main(["sample", str(run), "-n", "1", "--steps", "2", "--quiet", "--out", str(tmp_path / "s")]) == 0
    assert f"skipped the newest checkpoint(s), unusable ({newest.name}" in capsys.readouterr().err
    one_line(["sample", str(newest), "-n", "1", "--quiet"], "JSON object")
    # a config file of binary bytes
    binary = tmp_path / "options.yaml"
    binary.write_bytes(bytes(range(128, 256)))
    one_line(["train", "--config", str(binary), "--out", str(tmp_path / "x")], "options.yaml")
    assert not (tmp_path / "x").exists()


# 5. YAML that people write --------------------------------------------------------------------------------------------

def test_yaml_numbers_load_the_way_python_reads_them(tmp_path):
    path = tmp_path / "options.yaml"
    path.write_text("lr: 1e-4\nweight_decay: 5E-2\nsteps: 2e3\nema_decay: 0.99\nwarmup: 10\nname: 1e3x\n")
    data = load_config_file(path, fields_of(RunConfig, DiffusionConfig))
    assert data["lr"] == 1e-4 and isinstance(data["lr"], float) and data["weight_decay"] == 0.05
    run, _ = make_configs({}, DiffusionConfig, data)
    assert (run.lr, run.steps, run.warmup, run.name) == (1e-4, 2000, 10, "1e3x") and isinstance(run.steps, int)


# 6. sample and load fall back -----------------------------------------------------------------------------------------

def test_load_falls_back_past_a_damaged_newest_checkpoint(run, capsys):
    ema = run / "checkpoints" / "step_0000002" / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:100])
    model = difflab.load(run, device="cpu")
    assert model.checkpoint.name == "step_0000001"
    assert "step_0000002: ema.safetensors" in capsys.readouterr().err
    shutil.rmtree(run / "checkpoints" / "step_0000001")
    with pytest.raises(DifflabError, match="no usable checkpoint"):
        difflab.load(run, device="cpu")


def test_load_while_a_run_trains_and_prunes_never_fails(run):
    trainer = subprocess.Popen([sys.executable, "-m", "difflab", "train", "--resume", str(run), "--steps", "1000000",
                                "--keep", "1", "--checkpoint-every", "1", "--log-every", "1000000", "--quiet"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        _wait_for(lambda: any(checkpoint_folders(run)[-1:]) and int(checkpoint_folders(run)[-1].name[5:]) > 5, 120,
                  "the run did not start checkpointing within 120 s")
        loads, steps, deadline = 0, set(), time.time() + 8
        while time.time() < deadline:
            steps.add(difflab.load(run, device="cpu").checkpoint.name)
            loads += 1
        assert trainer.poll() is None, trainer.communicate()
    finally:
        trainer.kill()
        trainer.wait()
    assert loads >= 20 and len(steps) >= 5  # many loads, of many checkpoints, while each was about to be pruned


# 7. small ones ------------------------------------------------------------------------------------------------------

def test_a_kill_while_pruning_leaves_no_half_checkpoint(run, monkeypatch):
    def killed(path, *args, **kwargs):  # the process dies after deleting one file of the old checkpoint
        next(f for f in sorted(Path(path).iterdir()) if f.is_file()).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        loop.train(DiffusionTask, resume=run, steps=3, keep=1, checkpoint_every=1, progress=False)
    monkeypatch.undo()
    assert all(checkpoint_problem(c) is None for c in checkpoint_folders(run))  # no half step_* folder
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")] == [".pruned-step_0000001"]
    loop.train(DiffusionTask, resume=run, steps=4, keep=1, checkpoint_every=1, progress=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000004"]  # the leftover is gone


def test_a_second_ctrl_c_quits_at_once(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    stop = GracefulStop(quiet=True)
    try:
        stop._handle(signal.SIGINT, None)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGINT, None)
    finally:
        stop.restore()
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun one Ctrl-C arrives twice within milliseconds
    stop = GracefulStop(quiet=True)
    try:
        stop._handle(signal.SIGINT, None)
        stop._handle(signal.SIGINT, None)
        assert stop.requested
    finally:
        stop.restore()


# 8. a weight-level guard ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", TASKS)
def test_an_update_that_makes_weights_non_finite_is_undone(tmp_path, capsys, monkeypatch, task):
    """AdamW with a valid learning rate cannot overflow a weight, so the fault is injected: the optimizer step of
    step 3 leaves one weight infinite (as a faulty kernel or a future optimizer might)."""
    task_class, settings, _ = TASKS[task]
    break_a_weight(monkeypatch, at_call=3)
    run = loop.train(task_class, steps=4, checkpoint_every=1, keep=0, out=str(tmp_path), name="w", progress=False,
                     **settings)
    assert "step 3: non-finite loss, gradient or updated weights, step skipped" in capsys.readouterr().out
    ckpts = run / "checkpoints"
    for which in ("model", "ema", "state"):  # step 3 changed nothing: weights, EMA and moments as after step 2
        a, b = load_file(ckpts / "step_0000002" / f"{which}.safetensors"), load_file(
            ckpts / "step_0000003" / f"{which}.safetensors")
        keys = [k for k in a if which != "state" or k.startswith("optimizer.")]
        assert keys and all(torch.equal(a[k], b[k]) for k in keys), which
    last = load_file(ckpts / "step_0000004" / "model.safetensors")
    assert all(bool(t.isfinite().all()) for t in last.values())  # and training went on from there
    assert json.loads((ckpts / "step_0000004" / "state.json").read_text())["skipped"] == 1
