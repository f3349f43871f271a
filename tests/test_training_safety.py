"""Training that never loses work: failed and damaged checkpoints, non-finite steps, interrupts, bad input,
and several processes (torchrun, gloo on CPU) training exactly like one."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from faults import nan_task
from PIL import Image
from safetensors.torch import load_file

import difflab
from difflab.cli import main
from difflab.errors import DifflabError
from difflab.tasks import DiffusionTask, NoisyClassifierTask, VAETask
from difflab.training import loop
from difflab.training.checkpoint import list_checkpoints

TINY = dict(progress=False, batch_size=16, log_every=1, sample_every=0, num_samples=2, sample_steps=1, warmup=2,
            model={"base_channels": 16})
# every task runs through the one loop: the injected faults below are tried on each of them
TASKS = {"diffusion": (DiffusionTask, TINY, "train"),
         "classifier": (NoisyClassifierTask, dict(progress=False, batch_size=16, log_every=1, sample_every=0, warmup=2,
                                                  model={"base_channels": 16}), "train-classifier"),
         "vae": (VAETask, dict(progress=False, batch_size=16, log_every=1, sample_every=0, warmup=2, preset="tiny-f2",
                               model={"block_channels": [16, 32], "latent_channels": 2, "norm_groups": 8},
                               num_samples=4, stats_images=64), "train-vae")}


def _weights(checkpoint: Path, which: str = "model") -> dict:
    return load_file(checkpoint / f"{which}.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rows(run: Path) -> list[dict]:
    """log.jsonl, read as strict JSON (no NaN or Infinity, which strict readers refuse)."""
    def refuse(constant):
        raise ValueError(f"log.jsonl holds {constant}, which is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in (run / "log.jsonl").read_text().splitlines()]


def test_resume_is_bit_identical_with_dropout_flips_and_labels(tmp_path):
    """Every random draw (dropout, flips, label dropout, noise) must come back identically after a resume."""
    common = dict(TINY, model={"base_channels": 16, "dropout": 0.3}, hflip=True, conditional=True, out=str(tmp_path),
                  checkpoint_every=3, eval_every=100, eval_samples=4)
    straight = difflab.train(steps=6, name="straight", **common)
    half = difflab.train(steps=3, name="half", **common)
    difflab.train(resume=half, steps=6, progress=False)
    for which in ("model", "ema"):
        assert _same(_weights(straight / "checkpoints/step_0000006", which), _weights(half / "checkpoints/step_0000006", which))


@pytest.mark.parametrize("task", TASKS)
def test_failed_checkpoint_write_is_reported_and_training_continues(tmp_path, monkeypatch, capsys, task):
    import difflab.training.checkpoint as ckpt

    original, calls = ckpt.save_file, {"n": 0}

    def flaky(tensors, path, *args, **kwargs):  # the 2nd checkpoint (step 4) dies half-way: disk full
        calls["n"] += 1
        if calls["n"] == 5:  # model, ema, state of step 2, then model of step 4 ... fails on its ema file
            Path(path).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return original(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", flaky)
    task_class, settings, _ = TASKS[task]
    run = loop.train(task_class, steps=6, checkpoint_every=2, keep=5, out=str(tmp_path), name="r", **settings)
    out = capsys.readouterr().out
    assert "No space left on device" in out and "training continues" in out, out
    assert [c.name for c in list_checkpoints(run)] == ["step_0000002", "step_0000006"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert [r["step"] for r in _rows(run)] == [1, 2, 3, 4, 5, 6]  # every step trained and logged


@pytest.mark.parametrize("task", TASKS)
def test_damaged_newest_checkpoint_is_skipped_and_resume_stays_exact(tmp_path, capsys, task):
    task_class, settings, _ = TASKS[task]
    straight = loop.train(task_class, steps=9, checkpoint_every=3, out=str(tmp_path), name="straight", **settings)
    run = loop.train(task_class, steps=6, checkpoint_every=3, out=str(tmp_path), name="broken", **settings)
    newest = run / "checkpoints" / "step_0000006" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # a crash mid-copy, bit rot, ...
    loop.train(task_class, resume=run, steps=9, progress=False)
    assert "skipping damaged checkpoint" in capsys.readouterr().out
    final = "checkpoints/step_0000009"
    assert _same(_weights(straight / final), _weights(run / final))  # resumed from step 3: still bit-identical
    assert _same(_weights(straight / final, "ema"), _weights(run / final, "ema"))


@pytest.mark.parametrize("task", TASKS)
def test_non_finite_steps_are_skipped_counted_and_logged(tmp_path, capsys, task):
    task_class, settings, _ = TASKS[task]
    run = loop.train(nan_task(task_class, {3, 4}), steps=6, checkpoint_every=1, keep=10, out=str(tmp_path),
                     name="nan", **settings)
    rows = _rows(run)
    assert [r["skipped"] for r in rows] == [0, 0, 1, 2, 2, 2]
    assert rows[2]["loss"] is None and rows[2]["grad_norm"] is None and rows[4]["loss"] is not None
    out = capsys.readouterr().out
    assert "step 3: non-finite" in out and "step 4: non-finite" in out
    ckpts = run / "checkpoints"
    # the skipped steps changed nothing: weights, EMA and optimizer state after step 4 equal those after step 2
    for which in ("model", "ema", "state"):
        a, b = _weights(ckpts / "step_0000002", which), _weights(ckpts / "step_0000004", which)
        if which == "state":
            a = {k: v for k, v in a.items() if k.startswith("optimizer.")}
            b = {k: v for k, v in b.items() if k.startswith("optimizer.")}
        assert _same(a, b), which
    assert not _same(_weights(ckpts / "step_0000004"), _weights(ckpts / "step_0000005"))
    assert json.loads((ckpts / "step_0000004" / "state.json").read_text())["skipped"] == 2


@pytest.mark.parametrize("task", TASKS)
def test_k_non_finite_steps_in_a_row_stop_the_run_with_a_good_checkpoint(tmp_path, task):
    task_class, settings, command = TASKS[task]
    with pytest.raises(DifflabError, match="3 non-finite steps in a row") as err:
        loop.train(nan_task(task_class, set(range(4, 100))), steps=50, max_bad_steps=3, checkpoint_every=100,
                   out=str(tmp_path), name="div", **settings)
    assert f"difflab {command} --resume" in str(err.value)
    run = tmp_path / "div"
    (checkpoint,) = list_checkpoints(run)
    assert checkpoint.name == "step_0000006"
    weights = _weights(checkpoint)
    assert all(torch.isfinite(v).all() for v in weights.values())
    loop.train(task_class, resume=run, steps=8, lr=1e-4, progress=False)  # a lower rate is allowed on resume
    assert [c.name for c in list_checkpoints(run)][-1] == "step_0000008"


@pytest.mark.parametrize("task", TASKS)
def test_sigint_saves_a_resumable_checkpoint(tmp_path, task):
    task_class, _, command = TASKS[task]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "difflab", command, "--steps", "100000", "--batch-size", "8", "--out", str(tmp_path),
           "--name", "int", "--sample-every", "0", "--log-every", "1", "--checkpoint-every", "100000", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    log = tmp_path / "int" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and log.read_text().count("\n") >= 3):
        time.sleep(0.2)
    assert log.is_file() and log.read_text().count("\n") >= 3, "training did not start within 120 s"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)  # an interrupt, as shells expect; 2 is for mistakes
    assert "difflab: stopped: interrupted after step" in err and f"difflab {command} --resume" in err, err
    (checkpoint,) = list_checkpoints(tmp_path / "int")
    step = int(checkpoint.name.split("_")[1])
    assert step >= 3
    run = loop.train(task_class, resume=tmp_path / "int", steps=step + 2, progress=False)
    assert list_checkpoints(run)[-1].name == f"step_{step + 2:07d}"


def test_bad_input_is_one_line_and_never_overwrites(tmp_path, one_line):
    run = difflab.train(steps=2, out=str(tmp_path), name="keep", **TINY)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    one_line(["train", "--out", str(tmp_path), "--name", "keep", "--steps", "3"], "already exists")
    one_line(["train", "--resume", str(run), "--channels", "3"], "channels")
    one_line(["train", "--ema-decay", "1.5", "--out", str(tmp_path)], "--ema-decay")
    one_line(["train", "--max-bad-steps", "-1", "--out", str(tmp_path)], "--max-bad-steps")
    one_line(["train", "--label-dropout", "2", "--out", str(tmp_path)], "--label-dropout")
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # nothing of the run was touched
    # a checkpoint whose config does not match its weights
    config = run / "checkpoints" / "step_0000002" / "config.json"
    data = json.loads(config.read_text())
    data["unet"]["base_channels"] = 32
    config.write_text(json.dumps(data))
    one_line(["sample", str(run)], "do not match")
    # a pickle offered as a checkpoint
    bad = tmp_path / "model.ckpt"
    torch.save({"w": torch.zeros(1)}, bad)
    one_line(["sample", str(bad)], "pickle")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_train_like_one(tmp_path):
    """2 ranks x 8 images = 1 process x 16 images: the same update (up to float summation order); only rank 0
    writes (one run folder, each log row once); interrupt-free run ends with a checkpoint."""
    args = ["train", "--steps", "4", "--batch-size", "16", "--device", "cpu", "--out", str(tmp_path), "--sample-every",
            "0", "--num-samples", "4", "--sample-steps", "2", "--log-every", "1", "--checkpoint-every", "2",
            "--warmup", "2", "--quiet", "--conditional"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port()), "-m", "difflab"]
    done = subprocess.run(torchrun + args + ["--name", "ddp"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]
    rows = _rows(tmp_path / "ddp")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    # at every checkpoint the ranks compare weight checksums: identical copies (model and EMA) on both
    assert [(r["step"], r["rank_weight_spread"]) for r in rows if "rank_weight_spread" in r] == [(2, 0.0), (4, 0.0)]
    assert done.stdout.count("done in") == 1  # only rank 0 talks
    single = difflab.train(steps=4, batch_size=16, device="cpu", out=str(tmp_path / "single"), sample_every=0,
                           num_samples=4, sample_steps=2, log_every=1, checkpoint_every=2, warmup=2, progress=False,
                           conditional=True)
    # Float sums in another order differ in the last bits; Adam divides each gradient by its own running RMS, so
    # for a few entries whose gradient is ~0 (zero-initialised output biases) that noise becomes a visible
    # fraction of one learning-rate step (2e-3). Everything else agrees to float32 precision.
    for which in ("model", "ema"):
        a = _weights(tmp_path / "ddp" / "checkpoints" / "step_0000004", which)
        b = _weights(single / "checkpoints" / "step_0000004", which)
        assert a.keys() == b.keys()
        diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
        assert diff.max() < 2e-4 and (diff > 1e-5).float().mean() < 1e-3, (which, diff.max(), (diff > 1e-5).sum())
    losses = [r["loss"] for r in rows if "loss" in r], [r["loss"] for r in _rows(single)]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-4, atol=1e-6)
    assert (tmp_path / "ddp" / "samples.png").is_file()
    # sharded sampling: 2 ranks x ~2.5 images = exactly the 5 images one process makes, each once
    sample = ["sample", str(tmp_path / "ddp"), "--class", "3", "-n", "5", "--steps", "3", "--sampler", "ddpm",
              "--individual", "--quiet", "--device", "cpu"]
    done = subprocess.run(torchrun[:-4] + ["--master_port", str(_free_port()), "-m", "difflab"] + sample
                          + ["--out", str(tmp_path / "sharded")], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(sample + ["--out", str(tmp_path / "one")]) == 0
    sharded = sorted((tmp_path / "sharded").glob("*_0000*.png"))
    one = sorted((tmp_path / "one").glob("*_0000*.png"))
    assert [p.name for p in sharded] == [p.name for p in one] and len(one) == 5
    pixels = [np.asarray(Image.open(p)) for p in sharded]
    assert all(np.array_equal(a, np.asarray(Image.open(b))) for a, b in zip(pixels, one))
    assert len({a.tobytes() for a in pixels}) == 5  # no duplicates
    # evaluation with on-the-fly sampling, shared by 2 ranks: the same numbers as one process
    evaluation = ["eval", "--real", "digits", "--fake", str(tmp_path / "ddp"), "-n", "30", "--steps", "3", "--quiet",
                  "--metrics", "fid,pr", "--device", "cpu"]
    done = subprocess.run(torchrun[:-4] + ["--master_port", str(_free_port()), "-m", "difflab"] + evaluation
                          + ["--json", str(tmp_path / "ddp.json")], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(evaluation + ["--json", str(tmp_path / "one.json")]) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("ddp.json", "one.json"))
    assert abs(a["fid"] - b["fid"]) < 1e-5 * b["fid"] and abs(a["precision"] - b["precision"]) < 0.05, (a, b)


def test_torchrun_trains_the_noise_aware_classifier_like_one_process(tmp_path):
    """The classifier gained DDP from the one loop: 2 ranks x 8 images give the update of 1 process x 16."""
    args = ["train-classifier", "--steps", "3", "--batch-size", "16", "--device", "cpu", "--log-every", "1",
            "--checkpoint-every", "3", "--warmup", "2", "--quiet"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port()), "-m", "difflab"]
    done = subprocess.run(torchrun + args + ["--out", str(tmp_path / "ddp")], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    for which in ("model", "ema"):
        a, b = (_weights(tmp_path / r / "digits-classifier" / "checkpoints" / "step_0000003", which) for r in ("ddp", "one"))
        diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
        assert diff.max() < 2e-4 and (diff > 1e-5).float().mean() < 1e-3, (which, diff.max())
    rows = [r for r in _rows(tmp_path / "ddp" / "digits-classifier") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(0 <= r["train_accuracy"] <= 1 for r in rows)


@pytest.mark.parametrize("task", TASKS)
def test_ctrl_c_under_torchrun_stops_every_rank_at_one_checkpoint(tmp_path, task):
    """Ctrl-C in a terminal reaches the launcher and every worker (one process group); the launcher forwards it
    again. All ranks must agree on the step, rank 0 saves once and says how to resume, and it resumes."""
    task_class, _, command = TASKS[task]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "difflab", command, "--steps", "100000", "--batch-size", "16",
           "--device", "cpu", "--out", str(tmp_path), "--name", "int", "--sample-every", "0", "--log-every", "1",
           "--checkpoint-every", "100000", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    log = tmp_path / "int" / "log.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (log.is_file() and log.read_text().count("\n") >= 2):
        time.sleep(0.2)
    assert log.is_file() and log.read_text().count("\n") >= 2, "training did not start within 180 s"
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    messages = [line for line in (out + err).splitlines() if line.startswith("difflab: ")]
    assert len(messages) == 1 and "interrupted after step" in messages[0] and "--resume" in messages[0], out + err
    (checkpoint,) = list_checkpoints(tmp_path / "int")
    step = int(checkpoint.name.split("_")[1])
    assert f"step {step};" in messages[0] and f"difflab {command} --resume" in messages[0]
    run = loop.train(task_class, resume=tmp_path / "int", steps=step + 1, progress=False, device="cpu")
    assert list_checkpoints(run)[-1].name == f"step_{step + 1:07d}"


def test_large_seeds_and_broken_log_lines_do_not_end_a_run(tmp_path, capsys):
    run = difflab.train(steps=2, seed=2**31 - 1, out=str(tmp_path), name="seed", **{**TINY, "sample_every": 1})
    assert list_checkpoints(run)[-1].name == "step_0000002"
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a row cut short by a full disk
    difflab.train(resume=run, steps=4, progress=False)
    assert list_checkpoints(run)[-1].name == "step_0000004" and (run / "loss.png").is_file()
    with pytest.raises(DifflabError, match="--seed"):
        difflab.train(steps=1, seed=-1, out=str(tmp_path), **TINY)
