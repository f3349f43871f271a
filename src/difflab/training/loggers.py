"""Where a run's log goes: ``log.jsonl`` always (:meth:`Context.log <difflab.training.task.Context.log>` appends
its rows), and with ``--logger tensorboard`` also TensorBoard event files in ``RUN/tensorboard/``, so that
``tensorboard --logdir runs`` shows every run (each run folder is its own TensorBoard run).

TensorBoard gets the same numbers as log.jsonl, at the same training step, under one rule: ``eval_<name>`` is
``eval/<name>``, every other key ``<key>`` is ``train/<key>`` (``train/loss``, ``train/lr``, ``train/grad_norm``,
``train/img_per_s``, ``train/skipped``, a task's metrics, ``eval/fid``, ...). Each progress picture a task's
``show()`` writes into the run folder (samples.png, reconstructions.png, accuracy.png) is added as an image named
after its file, at the step it shows.

Only the main process writes (the loop opens the logger there alone). A resumed run appends a new event file to
the same folder; its first event tells TensorBoard to drop the points after the checkpoint that the interrupted run
had logged already, as the loop drops those rows of log.jsonl.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from pathlib import Path

import numpy as np
from PIL import Image

from difflab.extras import require
from difflab.viz import read_log

FOLDER = "tensorboard"  # inside the run folder


def new_log(bad_in_a_row: int = 0) -> dict:
    """Sums for the next log row: steps and finite steps since the last row, loss and metric sums over the
    finite ones, the clock, and the non-finite steps in a row (which carry over rows)."""
    return {"steps": 0, "finite": 0, "sums": {}, "t": time.perf_counter(), "bad_in_a_row": bad_in_a_row}


def log_row(state, batch_size: int) -> dict:
    """The next row of log.jsonl from ``state.log`` (loss None: every step since the last row was skipped), and a
    fresh ``state.log`` for the row after it."""
    log, now = state.log, time.perf_counter()
    means = {k: v / log["finite"] for k, v in log["sums"].items()} if log["finite"] else {}
    row = {"step": state.step, "loss": means.pop("loss", None), **means, "lr": log["lr"], "grad_norm": log["grad_norm"],
           "img_per_s": log["steps"] * batch_size / (now - log["t"]), "skipped": state.skipped}
    state.log = new_log(log["bad_in_a_row"])
    return row


def tag(key: str) -> str:
    """The TensorBoard tag of a log.jsonl key."""
    return f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"


class TensorBoardLogger:
    """TensorBoard event files in ``run_dir/tensorboard``. ``resumed_at``: the checkpoint step a resumed run goes on
    from (None for a new run)."""

    def __init__(self, run_dir: Path, resumed_at: int | None = None):
        tensorboard = require("torch.utils.tensorboard", extra="tensorboard", feature="--logger tensorboard")
        folder = Path(run_dir) / FOLDER
        earlier = resumed_at is not None and not folder.is_dir()  # tensorboard switched on at this resume
        # purge_step: TensorBoard hides what an earlier event file holds from that step on -- the steps after the
        # checkpoint, which this run trains (and logs) again. flush_secs: a run being watched shows its points soon
        self.writer = tensorboard.SummaryWriter(str(folder), flush_secs=20,
                                                purge_step=None if resumed_at is None else resumed_at + 1)
        if earlier:  # the run so far, from its log.jsonl (already cut back to the checkpoint); pictures from now on
            with contextlib.suppress(OSError):
                for row in read_log(Path(run_dir) / "log.jsonl"):
                    self.scalars(row)

    def scalars(self, row: dict) -> None:
        """One log.jsonl row: each number at the row's step (a None -- a non-finite value -- is left out, as
        log.jsonl leaves it empty)."""
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(tag(key), value, row["step"])

    def picture(self, path: Path, step: int) -> None:
        """A PNG the task drew, as an image named after the file."""
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))  # grayscale grids and RGBA plots alike
        self.writer.add_image(path.stem, pixels, step, dataformats="HWC")

    def close(self) -> None:
        """Write out what is buffered and release the event file."""
        self.writer.close()


@contextlib.contextmanager
def pictures_logged(ctx, step: int):
    """Around a task's ``show()``: the PNGs it writes at the top of the run folder also go to TensorBoard (when
    ``ctx.board`` is one). Watching the folder rather than each task's drawing code keeps tasks unaware of loggers:
    a file counts as written when its timestamp, size or content changed (a coarse file-system clock can give a
    rewritten picture the same timestamp)."""
    if ctx.board is None:
        yield
        return
    before = _fingerprints(ctx.run_dir)
    yield

    def add() -> None:
        for path, print_ in sorted(_fingerprints(ctx.run_dir).items()):
            if before.get(path) != print_:
                ctx.board.picture(path, step)

    ctx.on_main("adding the pictures to TensorBoard", add)


def _fingerprints(folder: Path) -> dict[Path, tuple]:
    prints = {}
    for path in folder.glob("*.png"):
        with contextlib.suppress(OSError):  # a file that vanished meanwhile
            stat = path.stat()
            prints[path] = (stat.st_mtime_ns, stat.st_size, hashlib.sha1(path.read_bytes()).digest())
    return prints
