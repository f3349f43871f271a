"""The training step on the device (training/step.py): nothing read back inside a step, the non-finite gate and the
weight guard over windows of several steps, divergence caught at the next check, and bf16 autocast following the
float32 loss trajectory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from faults import break_a_weight, nan_task
from safetensors.torch import load_file

from difflab.errors import DifflabError
from difflab.tasks import DiffusionTask, NoisyClassifierTask, VAETask
from difflab.training import loop
from difflab.training.checkpoint import list_checkpoints
from difflab.training.step import Updater

SMALL = dict(progress=False, batch_size=16, sample_every=0, num_samples=2, sample_steps=1, warmup=2,
             model={"base_channels": 16})
TASKS = {"diffusion": (DiffusionTask, {**SMALL, "conditional": True, "hflip": True}),
         "classifier": (NoisyClassifierTask, dict(progress=False, batch_size=16, sample_every=0, warmup=2,
                                                  model={"base_channels": 16})),
         "vae": (VAETask, dict(progress=False, batch_size=16, sample_every=0, warmup=2, preset="tiny-f2",
                               model={"block_channels": [16, 32], "latent_channels": 2, "norm_groups": 8},
                               num_samples=4, stats_images=64))}
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


def _weights(checkpoint: Path, which: str = "model") -> dict:
    return load_file(checkpoint / f"{which}.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("task", TASKS)
def test_a_training_step_reads_nothing_back_from_the_device(tmp_path, monkeypatch, task):
    """Drawing the batch, the loss and the update (backward, clip, gate, AdamW, EMA) call no tensor-to-Python
    conversion: on a GPU each would wait for the device. Only the checks (every log row) read."""
    task_class, settings = TASKS[task]
    inside = {"on": False, "reads": []}

    def guard(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if inside["on"]:
                inside["reads"].append(name)
                raise AssertionError(f"Tensor.{name} inside a training step")
            return original(self, *args, **kwargs)
        return read

    def in_step(fn):
        def wrapped(*args, **kwargs):
            inside["on"] = True
            try:
                return fn(*args, **kwargs)
            finally:
                inside["on"] = False
        return wrapped

    class Watched(task_class):
        batch = in_step(task_class.batch)
        loss = in_step(task_class.loss)

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, guard(name))
    monkeypatch.setattr(Updater, "step", in_step(Updater.step))
    run = loop.train(Watched, steps=6, log_every=3, out=str(tmp_path), name="quiet", **settings)
    assert inside["reads"] == []
    rows = _rows(run)
    assert [r["step"] for r in rows] == [3, 6] and all(r["loss"] is not None for r in rows)


def test_non_finite_steps_inside_a_window_are_skipped_exactly(tmp_path, capsys):
    """Checked every 4 steps instead of every step: the same skipped steps, the same warnings, the same weights."""
    runs = {}
    for log_every in (1, 4):
        runs[log_every] = loop.train(nan_task(DiffusionTask, {3, 6, 7}), steps=8, log_every=log_every,
                                     checkpoint_every=4, out=str(tmp_path), name=f"every{log_every}", **SMALL)
        out = capsys.readouterr().out
        for line in ("step 3: non-finite loss, gradient or updated weights, step skipped (1 in a row, 1 in all)",
                     "step 6: non-finite loss, gradient or updated weights, step skipped (1 in a row, 2 in all)",
                     "step 7: non-finite loss, gradient or updated weights, step skipped (2 in a row, 3 in all)"):
            assert line in out, (log_every, out)
    rows = _rows(runs[4])
    assert [(r["step"], r["skipped"]) for r in rows] == [(4, 1), (8, 3)]
    assert rows[0]["loss"] is not None
    # the gate is the same on the device whenever the host looks: identical weights and optimizer state
    for step in ("step_0000004", "step_0000008"):
        a, b = (runs[k] / "checkpoints" / step for k in (1, 4))
        assert _same(_weights(a), _weights(b)), step
        sa, sb = _weights(a, "state"), _weights(b, "state")
        assert _same({k: v for k, v in sa.items() if k.startswith("optimizer.")},
                     {k: v for k, v in sb.items() if k.startswith("optimizer.")}), step
        assert json.loads((b / "state.json").read_text())["skipped"] == (1 if step.endswith("4") else 3)


def test_divergence_is_caught_at_the_next_check(tmp_path):
    """Non-finite from step 4 on, checked every 4 steps, --max-bad-steps 3: stopped at step 8 with the weights of
    step 3 (the bad steps never touched them)."""
    with pytest.raises(DifflabError, match=r"5 non-finite steps in a row \(up to step 8\)"):
        loop.train(nan_task(DiffusionTask, set(range(4, 100))), steps=50, log_every=4, max_bad_steps=3,
                   checkpoint_every=100, out=str(tmp_path), name="div", **SMALL)
    (checkpoint,) = list_checkpoints(tmp_path / "div")
    assert checkpoint.name == "step_0000008"
    straight = loop.train(DiffusionTask, steps=3, out=str(tmp_path), name="three", **SMALL)
    assert _same(_weights(checkpoint), _weights(list_checkpoints(straight)[-1]))


def test_an_update_that_breaks_a_weight_undoes_its_window(tmp_path, capsys, monkeypatch):
    """The update of step 6 leaves a weight infinite (injected): at the check of step 8 the weights, the EMA and the
    optimizer state go back to step 4, the window's four steps count as skipped, and training goes on."""
    break_a_weight(monkeypatch, at_call=6, value=float("inf"))
    run = loop.train(DiffusionTask, steps=12, log_every=4, checkpoint_every=4, keep=0, out=str(tmp_path), name="w",
                     **SMALL)
    out = capsys.readouterr().out
    assert "step 6: the update made a weight non-finite" in out and "go back to step 4" in out
    ckpts = run / "checkpoints"
    for which in ("model", "ema", "state"):
        a, b = _weights(ckpts / "step_0000004", which), _weights(ckpts / "step_0000008", which)
        keys = [k for k in a if which != "state" or k.startswith("optimizer.")]
        assert keys and all(torch.equal(a[k], b[k]) for k in keys), which
    assert json.loads((ckpts / "step_0000008" / "state.json").read_text())["skipped"] == 4
    assert "steps 5, 7-8 undone with it" in out
    last = _weights(ckpts / "step_0000012")
    assert all(bool(t.isfinite().all()) for t in last.values())
    assert not _same(last, _weights(ckpts / "step_0000008"))


def test_a_weight_breaking_update_is_one_bad_step_not_a_divergence(tmp_path, capsys, monkeypatch):
    """In a 30-step window with the default --max-bad-steps 20, the update of step 6 breaks a weight: the steps
    after it run on broken weights (their losses are NaN) until the check, which undoes the window -- one bad step,
    the others undone, and training goes on instead of stopping as 'diverged'."""
    break_a_weight(monkeypatch, at_call=6, value=float("nan"))
    run = loop.train(DiffusionTask, steps=40, log_every=30, checkpoint_every=100, out=str(tmp_path), name="w",
                     **SMALL)
    out = capsys.readouterr().out
    assert "step 6: non-finite loss, gradient or updated weights, step skipped (1 in a row, 30 in all)" in out
    rows = _rows(run)
    assert [(r["step"], r["skipped"]) for r in rows] == [(30, 30), (40, 30)]
    assert rows[0]["loss"] is None and rows[1]["loss"] is not None
    assert all(bool(t.isfinite().all()) for t in _weights(list_checkpoints(run)[-1]).values())


def test_bf16_autocast_follows_the_float32_loss_trajectory(tmp_path):
    """300 steps on the digits, the same batches and noise: bf16 autocast (the GPU default, here on the CPU) and
    float32 give the same loss curve within bf16 tolerance, and both learn."""
    curves = {}
    for precision in ("fp32", "bf16"):
        run = loop.train(DiffusionTask, steps=300, log_every=50, checkpoint_every=300, precision=precision,
                         out=str(tmp_path), name=precision, **{**SMALL, "batch_size": 32})
        curves[precision] = [r["loss"] for r in _rows(run)]
    fp32, bf16 = curves["fp32"], curves["bf16"]
    assert len(fp32) == len(bf16) == 6
    assert fp32[-1] < 0.6 * fp32[0]  # it learns
    for a, b in zip(fp32, bf16):
        assert abs(a - b) < 0.01 * a, (fp32, bf16)  # measured: under 0.25%
