"""The task seam: what an objective supplies to the one training loop (:mod:`difflab.training.loop`).

The loop owns everything that is not the objective: seeding and exact resume, torchrun/DDP, the learning-rate
schedule, autocast, gradient clipping, the non-finite-step gate, the EMAs, logging and the loss plot, interrupts
and atomic checkpoints. A task supplies only what is specific to it (EDM2's loop calls ``loss_fn(net, images,
labels)`` the same way):

    class MyTask(Task):
        name, noun, command = "my-task", "my model", "difflab train-my-task"
        config_class = MyConfig                        # its own settings, a dataclass of training.config.setting()s

        def setup(self) -> nn.Module: ...              # load data, build and return the network to train
        def batch(self, step, generator): ...          # this process's share of global batch ``step``
        def loss(self, net, batch): ...                # per-example loss (n,) and per-example metrics to log
        def model_config(self) -> dict: ...            # config.json that rebuilds the trained model
        def checkpoint_modules(self): ...              # optional: further modules a checkpoint holds (a frozen VAE)
        def before_final_checkpoint(self, ema): ...    # optional: results the final config records (latent stats)
        def show(self, step, ema): ...                 # optional: a progress picture (sample grid, ...)
        def evaluate(self, step, ema): ...             # optional: metrics of the EMA model, logged as eval_*
        def finish(self, ema): ...                     # optional: after the final checkpoint (accuracy table, ...)
        def after_step(self, step): ...                # optional: after each optimizer step (a distillation stage ends)
        def checks_before(self, step): ...             # optional: True where after_step reads or changes the weights
        @classmethod
        def derived_run_settings(cls, config): ...     # optional: shared settings it derives (distill: steps)

The loop sets ``task.emas`` (name -> EMA module, "ema" first) before the first step, for a task whose loss reads an
EMA (the target network of consistency distillation); resuming restores them in place.

Registering it in :data:`difflab.tasks.TASKS` gives it a ``difflab`` command with one flag per setting.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from difflab import distributed
from difflab.distributed import DistInfo
from difflab.training.config import RunConfig


@dataclass
class Context:
    """The run as a task sees it: which process this is, on which device, and where the run folder is."""

    dist: DistInfo
    progress: bool                       # show progress bars (the main process, unless asked to be quiet)
    run_dir: Path | None = None          # set once the folder is chosen (before the first step)
    board: Any = None                    # a TensorBoardLogger with --logger tensorboard (main process), else None
    memory_format: torch.memory_format = torch.contiguous_format  # of the network and its batches (devices.py)

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def main(self) -> bool:
        return self.dist.is_main

    def shard(self, batch_size: int) -> slice:
        """This process's slice of a global batch of ``batch_size`` (all of it in a single process)."""
        return slice(*distributed.shard_range(batch_size, self.dist.rank, self.dist.world_size))

    def on_main(self, what: str, fn: Callable[[], Any]) -> None:
        """A side effect of the main process only (a log row, a picture, a file). It must never end a run (a full
        disk, a metric that cannot be computed from too few samples): a failure is reported and training goes on."""
        if self.main:
            try:
                fn()
            except Exception as e:  # no collective runs in here, so the other processes are not left waiting
                tqdm.write(f"warning: {what} failed: {type(e).__name__}: {e}; training continues")

    def log(self, row: dict) -> None:
        """Append one JSON row to the run's ``log.jsonl``, and send it to TensorBoard when that is on (main process;
        failures are reported, not raised)."""
        def append() -> None:
            with open(self.run_dir / "log.jsonl", "a") as f:  # strict JSON: a NaN or an infinity is written null
                f.write(json.dumps({k: _finite_or_none(v) for k, v in row.items()}, allow_nan=False) + "\n")

        self.on_main("writing the log", append)
        if self.board is not None:
            self.on_main("writing the TensorBoard events", lambda: self.board.scalars(row))


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


class Task:
    """Base class of training objectives; see the module doc for what a subclass defines."""

    name: ClassVar[str]                   # registry key and the section of the run's config.json
    noun: ClassVar[str]                   # what it trains, in messages ("a ... run")
    command: ClassVar[str]                # the command that resumes it, in messages
    config_class: ClassVar[type]          # its own settings
    run_defaults: ClassVar[dict] = {}     # its defaults for shared settings (RunConfig fields)
    folder_suffix: ClassVar[str] = ""     # default run folder: dataset name + suffix
    folder_base: str | None = None        # ... or this name + suffix (setup may set it: distill's is the teacher's)
    summary: ClassVar[str] = ""           # its command in `difflab --help`
    description: ClassVar[str] = ""       # ... and at the top of the command's --help
    examples: ClassVar[str] = ""          # ... and at the bottom
    report: ClassVar[str] = "{run}"       # printed when training ends ({run}: the run folder, {run_arg}: shell-quoted)
    positional: ClassVar[str | None] = None   # a setting given as the command's argument (distill: the teacher)
    derived_fields: ClassVar[tuple[str, ...]] = ()   # the shared settings derived_run_settings() sets
    derived_help: ClassVar[str] = ""      # ... and why (in --help and in the error)
    emas: dict[str, nn.Module]            # set by the loop before the first step

    def __init__(self, run: RunConfig, config, ctx: Context):
        self.run, self.config, self.ctx = run, config, ctx

    @classmethod
    def check(cls, run: RunConfig, config) -> None:
        """One-line errors for settings out of range, before any work is done."""

    @classmethod
    def derived_run_settings(cls, config) -> dict:
        """Shared settings (RunConfig fields) that follow from the task's own settings; giving another value is an
        error (distillation derives --steps from its stages)."""
        return {}

    def after_step(self, step: int) -> None:
        """After optimizer step ``step`` (called on every process, before that step's checkpoint)."""

    def checks_before(self, step: int) -> bool:
        """Whether :meth:`after_step` of ``step`` reads or changes the weights or EMAs (a distillation stage ends): the
        loop then settles the device's accounts of the steps so far first (training/step.py)."""
        return False

    def setup(self) -> nn.Module:
        """Load the data and build the network to train (on ``ctx.device``). May replace ``self.run`` and
        ``self.config`` with copies whose values were resolved from the data (image size, channels, ...): those
        are what the run folder's config.json records."""
        raise NotImplementedError

    def ema_decays(self) -> dict[str, float]:
        """The moving averages of the weights to keep: name -> decay; the first is ``ema`` (what is sampled)."""
        return {"ema": self.run.ema_decay}

    def batch(self, step: int, generator: torch.Generator) -> Any:
        """This process's share of global batch ``step``: every random draw from ``generator`` (saved in every
        checkpoint), drawn for the whole global batch before it is sliced, so any number of processes train alike."""
        raise NotImplementedError

    def loss(self, net: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-example loss (n,) and per-example metrics (name -> (n,)) to log as averages. Runs under autocast;
        ``net`` is the network from :meth:`setup`, wrapped for DDP or compiled when asked."""
        raise NotImplementedError

    def model_config(self) -> dict:
        """The JSON that rebuilds the trained model (config.json of every checkpoint)."""
        raise NotImplementedError

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        """Further modules every checkpoint must hold to rebuild the model, saved as ``<name>.safetensors`` (a latent
        model's frozen autoencoder: ``vae``)."""
        return {}

    def before_final_checkpoint(self, ema: nn.Module) -> None:
        """Work whose result the final checkpoint's :meth:`model_config` records (called on every process; e.g. the
        autoencoder's latent statistics)."""

    def show(self, step: int, ema: nn.Module) -> None:
        """Draw a progress picture into the run folder (called on every process; write files via ``ctx.on_main``)."""

    def evaluate(self, step: int, ema: nn.Module) -> dict[str, float] | None:
        """Metrics of the EMA model, logged with an ``eval_`` prefix (called on every process)."""
        return None

    def finish(self, ema: nn.Module) -> None:
        """Work after the final checkpoint (called on every process)."""
