"""The parts of a run the training loop keeps outside itself: run folders, a stateless data order, per-step
seeds, the learning-rate schedule, the log, and graceful interruption."""

from __future__ import annotations

import functools
import json
import math
import os
import shlex
import shutil
import signal
import threading
import time
from pathlib import Path

import torch

from difflab.errors import DifflabError
from difflab.training.lock import LOCK_NAME, RunFolderBusy, RunLock


def check_run_name(name: str | None) -> None:
    """A run name is one folder name inside ``--out``: no path separators, not '.' or '..'."""
    if name is not None and (not name.strip() or name in (".", "..") or "/" in name or "\\" in name
                             or "\0" in name):
        raise DifflabError(f"--name must be a plain folder name inside --out (no '/' and not '..'), got {name!r}; "
                           "use --out to put runs elsewhere")


def _holds_work(folder: Path) -> bool:
    """Whether a folder holds anything besides a run lock."""
    return folder.is_dir() and any(p.name != LOCK_NAME for p in folder.iterdir())


def prepare_run_dir(cfg, overwrite: bool, suffix: str = "", base: str | None = None) -> tuple[Path, RunLock]:
    """A fresh run folder, locked for this process (see :mod:`difflab.training.lock`). A default name (``base``, else
    the dataset's name, plus ``suffix``) is numbered when taken; an explicit one is never overwritten unless asked, and
    never while another process trains in it, so no earlier run is lost."""
    check_run_name(cfg.name)
    out = Path(cfg.out)
    base = cfg.name or (base or Path(cfg.dataset.rstrip("/")).name or "run") + suffix
    k = 1
    while True:
        run = out / (base if k == 1 else f"{base}-{k}")
        k += 1
        numbered = cfg.name is None and not (overwrite and run.name == base)
        if numbered and (_holds_work(run) or (run.exists() and not run.is_dir())):
            continue
        if run.exists() and not run.is_dir():
            raise DifflabError(f"'{run}' is a file, not a run folder: choose another --name")
        if not numbered and not overwrite and _holds_work(run):
            raise _exists(run)
        try:
            run.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DifflabError(f"cannot create run folder '{run}': {e.strerror}") from None
        try:
            lock = RunLock(run).acquire()
        except RunFolderBusy:
            if numbered:  # another run started in this folder a moment ago: take the next number
                continue
            raise
        if _holds_work(run):  # looked again under the lock: another process may have written it meanwhile
            if numbered:
                lock.release()
                continue
            if not overwrite:
                lock.release()
                raise _exists(run)
            try:
                for entry in run.iterdir():  # replaced under the lock: nobody trains in it now
                    if entry.name != LOCK_NAME:
                        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            except OSError as e:
                lock.release()
                raise DifflabError(f"cannot replace run folder '{run}': {e.strerror} ({e.filename})") from None
        return run, lock


def _exists(run: Path) -> DifflabError:
    return DifflabError(f"run folder '{run}' already exists: use --resume {shell_quote(run)} to continue it, "
                        "--overwrite to replace it, or another --name")


def shell_quote(path) -> str:
    """A path as it must be typed in a shell (spaces, quotes), for the commands that messages suggest."""
    return shlex.quote(str(path))


def batch_indices(step: int, batch_size: int, n: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The dataset indices of a step: epochs are seeded permutations, so the order is a pure function
    of the step and resuming needs no data-loader state. Each epoch's order is moved to ``device`` once, so a step
    slices it there (no host-to-device copy, which would wait for the GPU, per step)."""
    start, stop = step * batch_size, (step + 1) * batch_size
    epochs = range(start // n, (stop - 1) // n + 1)
    orders = [_epoch_permutation(e, n, seed, str(device)) for e in epochs]
    order = orders[0] if len(orders) == 1 else torch.cat(orders)
    offset = start - epochs[0] * n
    return order[offset: offset + batch_size]


@functools.lru_cache(maxsize=4)
def _epoch_permutation(epoch: int, n: int, seed: int, device: str) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).to(device)


PHOTO_DATASETS = ("cifar10",)  # datasets where a mirror image is still a plausible image


def default_hflip(dataset_name: str) -> bool:
    """Random horizontal flips by default for photos (CIFAR-10, image folders), not for digits and MNIST-likes."""
    return dataset_name in PHOTO_DATASETS or dataset_name.startswith("folder")


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image of a batch with probability 1/2 (one draw per image from ``generator``)."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of the global generator (dropout) at one training step of one process: a pure function, so a
    resumed run draws what an uninterrupted one would, and processes draw differently."""
    return ((seed * 1_000_003 + step) * 65_536 + rank) % 2**63


def restore_noise_generator(gen: torch.Generator, tensors: dict, meta: dict, seed: int) -> None:
    """Put back the training noise stream saved in a checkpoint (``rng.noise``, written on ``noise_device``).
    A generator state of one device type does not fit another: then the stream restarts from a seed of the
    step, which trains correctly but not bit-identically to an uninterrupted run (said in a warning)."""
    if meta.get("noise_device", "cpu") == gen.device.type:
        gen.set_state(tensors["rng.noise"])
    else:
        print(f"warning: the run trained on {meta.get('noise_device')} and resumes on {gen.device.type}: "
              "training continues correctly but not bit-identically to an uninterrupted run")
        gen.manual_seed(seed + 1 + meta["step"])


def learning_rate(updates: torch.Tensor, run) -> torch.Tensor:
    """Linear warm-up to the peak rate ``run.lr`` over ``run.warmup`` updates, then constant (as in DDPM) or, with
    ``run.lr_schedule == "cosine"``, a half cosine down to 0 at ``run.steps`` (Loshchilov & Hutter 2017). ``updates``
    (optimizer updates so far, skipped steps not counted) is a float64 tensor: the training step keeps it on the
    device, so the schedule follows the non-finite gate without the host reading it."""
    warm = run.lr * torch.clamp((updates + 1) / max(1, run.warmup), max=1.0)
    if run.lr_schedule == "constant":
        return warm
    progress = torch.clamp((updates - run.warmup) / max(1, run.steps - run.warmup), max=1.0)
    return torch.where(updates < run.warmup, warm, run.lr * 0.5 * (1 + torch.cos(math.pi * progress)))


class GracefulStop:
    """The first Ctrl-C (or SIGTERM) asks the loop to finish its step, checkpoint and stop; a second one
    interrupts at once. Under torchrun, signals within ``grace`` seconds of the first count as the same request: a
    Ctrl-C there reaches each worker twice (from the terminal, then forwarded by the launcher) in milliseconds,
    while a person pressing Ctrl-C again takes longer. A single process has no grace: the second one quits."""

    def __init__(self, quiet: bool = False, grace: float | None = None):
        if grace is None:
            grace = 1.0 if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0.0
        self.requested, self.quiet, self.grace, self._first = False, quiet, grace, 0.0
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            if time.monotonic() - self._first > self.grace:
                raise KeyboardInterrupt
            return
        self.requested, self._first = True, time.monotonic()
        if not self.quiet:
            print("\nstopping after this step and saving a checkpoint (press Ctrl-C again to quit at once)")

    def restore(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def truncate_log(path: Path, step: int) -> None:
    """On resume, drop log rows written after the checkpoint (they will be written again)."""
    if path.is_file():
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
        path.write_text("".join(r + "\n" for r in kept))
