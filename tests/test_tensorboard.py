"""``--logger tensorboard``: the event files under RUN/tensorboard, read back with TensorBoard's own reader, hold
what log.jsonl holds (same tags by one rule, same steps, same values) and every progress picture; a resumed run
continues them without duplicates; a missing tensorboard package is one line, before any work."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # the [test] extra has it
from torch import nn

import difflab
from difflab.cli import main
from difflab.errors import Interrupted
from difflab.training import loggers, loop
from difflab.training.config import setting
from difflab.training.loggers import tag
from difflab.training.task import Task

# a few steps of a small U-Net on the bundled digits: a log row every 2 steps, a grid and a checkpoint every 3
TINY = dict(batch_size=16, log_every=2, sample_every=3, checkpoint_every=3, num_samples=4, sample_steps=2,
            model={"base_channels": 16}, warmup=2, progress=False)


def events(run) -> EventAccumulator:
    board = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})  # 0: keep all
    board.Reload()
    return board


def log_rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def assert_board_matches_log(run) -> None:
    """Every number of every log.jsonl row is a scalar at the row's step, and nothing else is."""
    board, expected = events(run), {}
    for row in log_rows(run):
        for key, value in row.items():
            if key != "step" and value is not None:
                expected.setdefault(tag(key), []).append((row["step"], value))
    assert sorted(board.Tags()["scalars"]) == sorted(expected)
    for name, points in expected.items():
        got = [(e.step, e.value) for e in board.Scalars(name)]
        assert [s for s, _ in got] == [s for s, _ in points], name  # in order, none twice
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), name  # stored as float32


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tb_runs")
    return difflab.train(steps=6, out=str(out), name="tb", logger="tensorboard", eval_every=3, eval_samples=64,
                         **TINY)


def test_scalars_are_log_jsonl_with_the_training_step(run):
    assert_board_matches_log(run)
    tags = events(run).Tags()["scalars"]
    for name in ("train/loss", "train/lr", "train/grad_norm", "train/img_per_s", "train/skipped", "eval/fid"):
        assert name in tags, name
    assert [e.step for e in events(run).Scalars("eval/fid")] == [3, 6]
    assert json.loads((run / "config.json").read_text())["run"]["logger"] == "tensorboard"


def test_every_sample_grid_is_an_image_at_its_step(run):
    images = events(run).Images("samples")
    width, height = Image.open(run / "samples.png").size
    assert [e.step for e in images] == [3, 6]
    assert all((e.width, e.height) == (width, height) for e in images)
    last = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
    assert np.array_equal(last, np.asarray(Image.open(run / "samples.png").convert("RGB")))
    assert "loss" not in events(run).Tags()["images"]  # the loss plot is the scalars already


def test_a_resumed_run_continues_without_duplicates(tmp_path):
    first = difflab.train(steps=6, out=str(tmp_path), name="crashed", logger="tensorboard", **TINY)
    # as if it had crashed after logging step 6 and before its checkpoint: rows 4 and 6 are trained again
    shutil.rmtree(first / "checkpoints" / "step_0000006")
    resumed = difflab.train(resume=first, steps=8, progress=False)
    assert [r["step"] for r in log_rows(resumed)] == [2, 4, 6, 8]
    assert len(list((resumed / "tensorboard").glob("events.out.tfevents.*"))) == 2  # appended, not replaced
    assert_board_matches_log(resumed)
    assert [e.step for e in events(resumed).Images("samples")] == [3, 6, 8]  # 6 drawn again, and the end


def test_switched_on_at_resume_it_shows_the_run_so_far(tmp_path):
    first = difflab.train(steps=4, out=str(tmp_path), name="late", **{**TINY, "sample_every": 0})
    assert not (first / "tensorboard").exists()  # jsonl (the default) writes log.jsonl only
    difflab.train(resume=first, steps=6, logger="tensorboard", progress=False)
    assert [r["step"] for r in log_rows(first)] == [2, 4, 6]
    assert_board_matches_log(first)


@dataclass
class LineSettings:
    slope: float = setting(2.0, "the slope to learn")


class FitALine(Task):
    """A fake objective with a metric of its own, an evaluation and an RGBA picture (a matplotlib plot's kind)."""

    name, noun, command = "fit-a-line", "line", "fit-a-line"
    config_class = LineSettings
    run_defaults = dict(lr=0.05, warmup=1, batch_size=8, log_every=1, sample_every=2, eval_every=2, device="cpu")

    def setup(self) -> nn.Module:
        return nn.Linear(1, 1)

    def batch(self, step, generator):
        x = torch.randn(self.run.batch_size, 1, generator=generator)
        return x, self.config.slope * x

    def loss(self, net, batch):
        err = (net(batch[0]) - batch[1]).square().squeeze(1)
        return err, {"abs_error": err.sqrt()}

    def model_config(self) -> dict:
        return {"format": "a-line"}

    def evaluate(self, step, ema):
        return {"slope": float(ema.weight)}

    def show(self, step, ema) -> None:
        pixels = np.full((10, 20, 4), (step * 40) % 256, dtype=np.uint8)
        self.ctx.on_main("drawing", lambda: Image.fromarray(pixels, "RGBA").save(self.ctx.run_dir / "fit.png"))


def test_task_metrics_evaluations_and_any_picture(tmp_path):
    run = loop.train(FitALine, steps=4, out=str(tmp_path), name="line", logger="tensorboard", progress=False)
    assert_board_matches_log(run)
    tags = events(run).Tags()["scalars"]
    assert "train/abs_error" in tags and "eval/slope" in tags
    images = events(run).Images("fit")
    assert [(e.step, e.width, e.height) for e in images] == [(2, 20, 10), (4, 20, 10)]


class StoppedByCtrlC(FitALine):
    def after_step(self, step) -> None:
        if step == 3:  # a Ctrl-C: the loop sees it at step 4's all-reduce, finishes that step, checkpoints, stops
            os.kill(os.getpid(), signal.SIGINT)


def test_an_interrupted_run_closes_its_event_file(tmp_path, monkeypatch):
    closed = []
    close = loggers.TensorBoardLogger.close
    monkeypatch.setattr(loggers.TensorBoardLogger, "close", lambda self: closed.append(close(self)))
    with pytest.raises(Interrupted):
        loop.train(StoppedByCtrlC, steps=10, out=str(tmp_path), name="stopped", logger="tensorboard", progress=False)
    run = tmp_path / "stopped"
    assert len(closed) == 1  # flushed and released on the way out
    assert [e.step for e in events(run).Scalars("train/loss")] == [1, 2, 3, 4]
    assert_board_matches_log(run)


def test_help_and_bad_logger(tmp_path, capsys, one_line):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--logger" in capsys.readouterr().out
    one_line(["train", "--logger", "wandb", "--out", str(tmp_path)], "--logger must be one of jsonl, tensorboard")
    assert not any(tmp_path.iterdir())


def test_missing_tensorboard_is_one_line_before_any_work(tmp_path, monkeypatch, one_line):
    # what an environment without the package looks like to torch.utils.tensorboard's `import tensorboard`
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    line = one_line(["train", "--logger", "tensorboard", "--steps", "2", "--out", str(tmp_path), "--quiet"],
                    "--logger tensorboard needs tensorboard, which is not installed", "pip install 'difflab[tensorboard]'")
    assert line.endswith("pip install 'difflab[tensorboard]'")
    assert not any(tmp_path.iterdir())  # refused at setup: no run folder, no data loaded, no step trained
