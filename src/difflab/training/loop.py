"""The one training loop (tutorial §4.1; DDPM Algorithm 1 for diffusion), for every task:

    for each step: seed -> batch -> loss -> backward, clip -> (finite?) optimizer step, EMA -> log
                   -> every N steps: evaluate, show, checkpoint

A task (:mod:`difflab.training.task`) supplies the data, the network and the loss; everything else is here,
once: exact resume (weights, EMAs, optimizer, step counter, data order and every random stream come back),
torchrun/DDP (each process takes its slice of the global batch; one all-reduce per step shares the loss, the
metrics and the stop flag), the learning-rate schedule, autocast, clipping, the non-finite-step gate, the EMAs,
``log.jsonl`` (and TensorBoard: :mod:`difflab.training.loggers`) and ``loss.png``, Ctrl-C/SIGTERM, and atomic
checkpoints that a failed write never costs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from difflab import distributed
from difflab.devices import autocast, compile_module, memory_format
from difflab.errors import DifflabError, Interrupted
from difflab.training.checkpoint import (
    CheckpointWriteError,
    latest_valid_checkpoint,
    list_checkpoints,
    load_state,
    load_training_state,
    load_weights,
    optimizer_from_tensors,
    optimizer_to_tensors,
    remove_leftovers,
    restore_set_aside,
    save_checkpoint,
    warn_damaged,
    write_json,
)
from difflab.training.config import check_run, from_json, frozen_fields, make_configs, to_json
from difflab.training.lock import RunLock
from difflab.training.loggers import TensorBoardLogger, log_row, new_log, pictures_logged
from difflab.training.runs import (
    GracefulStop,
    learning_rate,
    prepare_run_dir,
    restore_noise_generator,
    shell_quote,
    step_seed,
    truncate_log,
)
from difflab.training.step import Updater
from difflab.training.task import Context, Task
from difflab.viz import plot_loss


def train(task_class: type[Task], config: dict | None = None, *, resume: str | Path | None = None,
          overwrite: bool = False, progress: bool = True, **overrides) -> Path:
    """Train ``task_class``'s model and return its run folder.

    ``config`` is a dict of settings (shared and the task's own); keyword ``overrides`` win. With ``resume`` (a
    run folder) training continues from its newest checkpoint, bit-identical to a run that was never stopped;
    settings marked frozen cannot change then. ``overwrite`` replaces an existing folder of the same name."""
    run, cfg, resume_dir = configure(task_class, config, resume, overrides)
    with distributed.session(run.device) as info:  # one process, or one of several started by torchrun
        ctx = Context(info, progress and info.is_main)
        return _train(task_class(run, cfg, ctx), resume_dir, overwrite)


def configure(task_class: type[Task], config: dict | None, resume, overrides: dict):
    """(RunConfig, task config, run folder to resume or None), checked, from the arguments of :func:`train`."""
    if resume is None:
        run, cfg = make_configs(task_class.run_defaults, task_class.config_class, config, **overrides)
    else:
        overrides = {**(config or {}), **overrides}  # on resume a config dict says what to change, like keywords
        resume = Path(resume)
        saved = resume / "config.json"
        if not saved.is_file():
            raise DifflabError(f"cannot resume: '{resume}' is not a run folder (no config.json)")
        try:
            stored = json.loads(saved.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DifflabError(f"cannot resume: {saved} is damaged ({str(e).splitlines()[0]})") from None
        task_name, base = from_json(stored, saved)
        if task_name != task_class.name:
            raise DifflabError(f"'{resume}' is not a {task_class.noun} run (its config.json says task '{task_name}')")
        moved = [k for k in ("out", "name") if overrides.get(k) is not None and overrides[k] != base.get(k)]
        if moved:  # the run stays where it is; its config.json must not claim another place
            raise DifflabError(f"--{' and --'.join(moved)} cannot be given with --resume: it continues {resume} in "
                               "place (to branch off a new run from it, give --config RUN/config.json and a new "
                               "--name instead)")
        run, cfg = make_configs(task_class.run_defaults, task_class.config_class, base, **overrides)
        old_run, old_cfg = make_configs(task_class.run_defaults, task_class.config_class, base)
        def value(k, r, c):
            return getattr(r, k) if hasattr(r, k) else getattr(c, k)

        changed = [k for k in frozen_fields(type(run), type(cfg))
                   if overrides.get(k) is not None and value(k, run, cfg) != value(k, old_run, old_cfg)]
        if changed:
            raise DifflabError(f"cannot change {', '.join(changed)} when resuming a run")
    derived = task_class.derived_run_settings(cfg)  # e.g. distillation: --steps from the stages
    given = {**(config or {}), **overrides}
    clash = [k for k, v in derived.items() if given.get(k) is not None and given[k] != v]
    if clash:
        raise DifflabError(f"--{clash[0].replace('_', '-')} is set by the other settings of {task_class.command} "
                           f"(here {derived[clash[0]]}): {task_class.derived_help}")
    run = dataclasses.replace(run, **derived)
    check_run(run)
    task_class.check(run, cfg)
    return run, cfg, resume


@dataclass
class RunState:
    """Everything a checkpoint restores."""

    net: nn.Module                                  # the network being trained (not wrapped)
    emas: dict[str, nn.Module]                      # moving averages of its weights, "ema" first
    decays: dict[str, float]                        # the decay of each (the task's ema_decays(), asked once)
    optimizer: torch.optim.Optimizer
    noise: torch.Generator                          # every random draw of the batches
    step: int = 0                                   # steps done (skipped ones included)
    skipped: int = 0                                # non-finite steps so far: they changed nothing
    saved: int | None = None                        # the last step a checkpoint was attempted at
    log: dict = field(default_factory=dict)         # what the next log row averages

    @property
    def updates(self) -> int:
        """Optimizer updates so far: the learning-rate schedule and the EMA warm-up count these, not steps."""
        return self.step - self.skipped


def _train(task: Task, resume: Path | None, overwrite: bool) -> Path:
    ctx, run = task.ctx, task.run
    world = ctx.dist.world_size
    if run.batch_size % world:
        raise DifflabError(f"--batch-size {run.batch_size} (the global batch) must be divisible by the {world} "
                           "processes")
    names = list(task.ema_decays())
    if not names or names[0] != "ema" or any(not n.startswith("ema_") for n in names[1:]):
        raise DifflabError(f"task {task.name}: its EMAs must be 'ema' and then 'ema_<name>'s, got {names}")
    torch.manual_seed(run.seed)  # initial weights
    ctx.run_dir = resume  # a resumed run is known before setup (a latent model takes its autoencoder from it)
    net = task.setup()
    ctx.memory_format = memory_format(ctx.device)
    net = net.to(memory_format=ctx.memory_format)
    run = task.run  # resolved from the data (image size, channels, ...)
    # the EMAs are never trained, only averaged into: eval mode for good (dropout off when they are sampled)
    state = RunState(net, {name: copy.deepcopy(net).requires_grad_(False).eval() for name in names}, task.ema_decays(),
                     # fused: one kernel for all parameters, and it takes the device-side skip flag (step.py)
                     torch.optim.AdamW(net.parameters(), lr=run.lr, weight_decay=run.weight_decay, fused=True),
                     torch.Generator(device=ctx.device).manual_seed(run.seed + 1))
    task.emas = state.emas  # a task that learns from its own EMA (a consistency model's target network) reads it
    lock = None  # the run folder's lock (main process): one writer per folder, held to the end
    try:
        if resume is not None:
            ctx.run_dir = resume
            def take() -> RunLock:
                folder_lock = RunLock(resume).acquire()
                try:
                    restore_set_aside(resume)  # a checkpoint a killed writer left renamed (before anyone lists them)
                except OSError:
                    folder_lock.release()
                    raise
                return folder_lock

            lock = distributed.main_first(take)
            _restore(state, resume, run.seed, task.command)
            if ctx.main:
                remove_leftovers(resume)  # what a killed writer left; only now, with a checkpoint restored
                truncate_log(resume / "log.jsonl", state.step)
            if state.step >= run.steps:
                if ctx.main:
                    print(f"{resume} has already trained {state.step} steps (asked for {run.steps}); raise --steps "
                          "to go on")
                return resume
        else:  # the main process picks (and numbers) the folder; the others learn its name, or its error
            def choose() -> tuple[str, RunLock]:
                folder, folder_lock = prepare_run_dir(run, overwrite, task.folder_suffix, task.folder_base)
                return str(folder), folder_lock

            chosen, lock = distributed.main_first(choose) or (None, None)
            ctx.run_dir = Path(distributed.broadcast_object(chosen))
        distributed.main_first(lambda: write_json(ctx.run_dir / "config.json", to_json(task.name, run, task.config)))
        if run.logger == "tensorboard":  # the main process writes; None on the others
            ctx.board = distributed.main_first(
                lambda: TensorBoardLogger(ctx.run_dir, resumed_at=state.step if resume is not None else None))
        _loop(task, state)
        task.before_final_checkpoint(state.emas["ema"])
        _checkpoint(task, state, run.steps, final=True)
        ema = state.emas["ema"]
        if run.eval_every:
            _evaluate(task, state, run.steps)
        _show(task, ema, run.steps)
        task.finish(ema)
        return ctx.run_dir
    finally:
        if ctx.board is not None:  # flushed on every way out: done, an error, an interrupt
            ctx.board.close()
        if lock is not None:
            lock.release()


def _restore(state: RunState, run_dir: Path, seed: int, command: str) -> None:
    """Put back the newest usable checkpoint of ``run_dir``. A run without checkpoints yet starts at step 0; one
    whose checkpoints are all damaged is refused: starting over must be asked for, never happen silently."""
    problems = []  # (checkpoint, what is wrong with it)
    checkpoint = latest_valid_checkpoint(run_dir, report=lambda *damaged: problems.append(damaged))
    for damaged in problems if checkpoint is not None else ():
        warn_damaged(*damaged)
    if checkpoint is None:
        if problems:
            found = "; ".join(f"{c}: {p}" for c, p in problems)
            raise DifflabError(
                f"cannot resume {run_dir}: none of its {len(problems)} checkpoint(s) is usable ({found}). Nothing was "
                f"changed; restore a checkpoint, or start over (deleting them) with: {command} --config "
                f"{shell_quote(Path(run_dir) / 'config.json')} --out {shell_quote(Path(run_dir).parent)} --name "
                f"{shell_quote(Path(run_dir).name)} --overwrite", all_ranks=True)
        if distributed.is_main():
            print(f"{run_dir} has no checkpoint yet: training starts at step 0")
        return
    load_state(state.net, load_weights(checkpoint, "model"), checkpoint)
    for name, ema in state.emas.items():
        load_state(ema, load_weights(checkpoint, name), checkpoint)
    tensors, meta = load_training_state(checkpoint)
    if "optimizer" not in meta or "rng.noise" not in tensors:
        raise DifflabError(f"{checkpoint} holds weights but no training state (optimizer, random streams) to resume from")
    optimizer_from_tensors(state.optimizer, tensors, meta["optimizer"])
    restore_noise_generator(state.noise, tensors, meta, seed)
    state.step = state.saved = meta["step"]
    state.skipped = meta.get("skipped", 0)


def _loop(task: Task, state: RunState) -> None:
    ctx, run, world = task.ctx, task.run, task.ctx.dist.world_size
    train_net = state.net  # what the optimizer trains: wrapped by DDP (gradients averaged in backward) and compiled
    if world > 1:
        train_net = nn.parallel.DistributedDataParallel(state.net, device_ids=[ctx.device.index]
                                                        if ctx.device.type == "cuda" else None)
    if compile_enabled(run, ctx.device):
        train_net = compile_module(train_net, asked=run.compile is not None)
    # backward, clipping, the non-finite gate, AdamW and the EMAs, queued on the device without waiting for it;
    # the host reads the device's accounts at the checks below (training/step.py)
    updater = Updater(state.net, state.emas, state.decays, state.optimizer, grad_clip=run.grad_clip,
                      lr_schedule=lambda updates: learning_rate(updates, run), updates=state.updates,
                      world_size=world, first_step=state.step)
    bar = tqdm(total=run.steps, initial=state.step, desc=f"training {ctx.run_dir.name}", unit="step",
               disable=not ctx.progress, dynamic_ncols=True)
    state.log = new_log()
    stop, stop_agreed = GracefulStop(quiet=not ctx.main), False
    state.net.train()
    try:
        for step in range(state.step, run.steps):
            if stop_agreed:  # Ctrl-C / SIGTERM came during the previous step, which finished: save and stop
                _interrupted(task, state, step)
            # dropout draws from the global generator: seeded per step (and process), so resuming needs no
            # generator state and the processes of a DDP run drop different units
            torch.manual_seed(step_seed(run.seed, step, ctx.dist.rank))
            batch = task.batch(step, state.noise)
            with autocast(ctx.device, run.precision):
                per_example, metrics = task.loss(train_net, batch)
                loss = per_example.mean()
            stop_now = stop.requested  # read once: the check below and the stop agree
            updater.step(loss, metrics, stop_requested=stop_now)
            state.step += 1
            state.log["steps"] += 1
            bar.update(1)
            done = state.step
            logged = done % run.log_every == 0 or done == run.steps
            evaluate = bool(run.eval_every) and done % run.eval_every == 0 and done < run.steps
            show = bool(run.sample_every) and done % run.sample_every == 0 and done < run.steps
            save = done % run.checkpoint_every == 0 and done < run.steps
            # a check (the one wait for the device) before anything reads the weights or the step's accounts
            diverged = 0  # non-finite steps in a row, once they reach --max-bad-steps
            if logged or evaluate or show or save or task.checks_before(done) or (world == 1 and stop_now):
                diverged = _settle(task, state, updater.check())
            # one process stops when asked; under torchrun all stop at the step whose shared flag they all read
            stop_agreed = stop_now if world == 1 else updater.stop_seen
            task.after_step(done)  # after the EMAs, before any checkpoint of this step: what it changes is saved with it
            if diverged:
                _diverged(task, state, diverged)
            if logged:  # every process keeps the same sums; main writes
                row = log_row(state, run.batch_size)
                ctx.log(row)
                if ctx.main and row["loss"] is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.0f}")
            if stop_agreed or done == run.steps:  # an interrupt goes straight to the checkpoint; the end is below
                continue
            if evaluate:
                _evaluate(task, state, done)
            if show:
                _show(task, state.emas["ema"], done)
            if save:
                _checkpoint(task, state, done)
    finally:
        stop.restore()
        bar.close()


def compile_enabled(run, device: torch.device) -> bool:
    """``--compile`` as asked; by default on a GPU (the compiled training step is faster there, benchmarks/speed.py)
    and off on a CPU (where the compilation takes longer than a demo run trains)."""
    return run.compile if run.compile is not None else torch.device(device).type == "cuda"


def _settle(task: Task, state: RunState, report) -> int:
    """Take a check's report into the run state: skipped steps (warned about), the log row's sums. Returns the
    non-finite steps in a row when they reached --max-bad-steps (the loop stops after the step's after_step), else 0."""
    ctx, run, log = task.ctx, task.run, state.log
    state.skipped += len(report.bad) + len(report.rolled_back)
    log["finite"] += report.finite
    if report.finite:
        for name, value in report.sums.items():
            log["sums"][name] = log["sums"].get(name, 0.0) + value
    log.update(grad_norm=report.grad_norm, lr=report.lr)
    if ctx.main and (report.bad or report.rolled_back):
        before = state.skipped - len(report.bad) - len(report.rolled_back)
        lines = []
        if report.undone is not None:
            undone = f" (steps {_ranges(report.rolled_back)} undone with it)" if report.rolled_back else ""
            lines.append(f"warning: step {report.undone}: the update made a weight non-finite: the weights, the "
                         f"optimizer state and the EMAs go back to step {report.first}{undone}")
        in_a_row, previous = log["bad_in_a_row"], report.first
        for i, number in enumerate(report.bad):
            in_a_row, previous = (in_a_row + 1 if number == previous + 1 else 1), number
            lines.append(f"warning: step {number}: non-finite loss, gradient or updated weights, step skipped "
                         f"({in_a_row} in a row, {before + len(report.rolled_back) + i + 1} in all)")
        if len(lines) > 12:
            lines = [*lines[:6], f"warning: ... {len(lines) - 11} more ...", *lines[-5:]]
        for line in lines:
            tqdm.write(line)
    log["bad_in_a_row"] = report.bad_in_a_row
    reached = bool(run.max_bad_steps) and report.most_in_a_row >= run.max_bad_steps
    return report.most_in_a_row if reached else 0


def _ranges(steps: list[int]) -> str:
    """[5, 6, 7, 9] -> '5-7, 9'."""
    parts, start = [], None
    for i, s in enumerate(steps):
        start = s if start is None else start
        if i + 1 == len(steps) or steps[i + 1] != s + 1:
            parts.append(f"{start}-{s}" if s > start else f"{s}")
            start = None
    return ", ".join(parts)


def _diverged(task: Task, state: RunState, in_a_row: int) -> None:
    """--max-bad-steps non-finite steps in a row: a checkpoint of the untouched weights, and one message."""
    run, ctx = task.run, task.ctx
    path = _checkpoint(task, state, state.step)
    raise DifflabError(
        f"{in_a_row} non-finite steps in a row (up to step {state.step}): training diverged. The "
        f"weights were not touched by those steps{f' and are saved in {path}' if path else ''}; resume with "
        f"a lower --lr or --grad-clip: {task.command} --resume {shell_quote(ctx.run_dir)} --lr {run.lr / 10:g}",
        all_ranks=True)


def _interrupted(task: Task, state: RunState, step: int) -> None:
    """Save (unless this step already has a checkpoint) and stop every process with one message."""
    if state.saved != step:
        _checkpoint(task, state, step)
    newest = (list_checkpoints(task.ctx.run_dir) or [None])[-1]
    raise Interrupted(f"interrupted after step {step}; " + (
        f"newest checkpoint: {newest}. Continue with: {task.command} --resume {shell_quote(task.ctx.run_dir)}"
        if newest else "no checkpoint could be written"), all_ranks=True)


def _checkpoint(task: Task, state: RunState, step: int, *, final: bool = False) -> Path | None:
    """Write a checkpoint (main process only). A failed write (disk full, ...) is reported and training goes on
    with the previous checkpoints intact; only the final one must succeed, and then every process learns of the
    failure, so none waits for the others."""
    ctx = task.ctx
    if ctx.dist.world_size > 1:  # DDP keeps the copies identical; check it (a float64 checksum per process)
        with torch.no_grad():
            total = torch.stack([torch.cat([p.flatten() for p in m.parameters()]).double().sum()
                                 for m in (state.net, *state.emas.values())])
        spread = (distributed.all_reduce_(total.clone(), "max") - distributed.all_reduce_(total.clone(), "min")).abs()
        ctx.log({"step": step, "rank_weight_spread": float(spread.max())})
        if ctx.main and spread.max() > 0:
            tqdm.write(f"warning: the {ctx.dist.world_size} processes hold different weights at step {step} "
                       f"(checksum spread {float(spread.max()):.3g}); this should not happen under DDP")

    def write() -> Path:
        tensors, opt_meta = optimizer_to_tensors(state.optimizer)
        tensors["rng.noise"] = state.noise.get_state()
        extra = {**{name: ema for name, ema in state.emas.items() if name != "ema"}, **task.checkpoint_modules()}
        return save_checkpoint(ctx.run_dir, step, model=state.net, ema=state.emas["ema"], config=task.model_config(),
                               state_tensors=tensors, extra_weights=extra, keep=task.run.keep,
                               state_json={"optimizer": opt_meta, "skipped": state.skipped,
                                           "noise_device": ctx.device.type})

    state.saved = step  # on every rank (success or not), so all agree whether the step still needs one
    if final:
        return distributed.main_first(write, error_prefix="training finished but its final checkpoint failed: ")
    path = None
    if ctx.main:
        try:
            path = write()
        except CheckpointWriteError as e:
            tqdm.write(f"warning: {e}; training continues, the newest good checkpoint stays "
                       f"{(list_checkpoints(ctx.run_dir) or [Path('(none yet)')])[-1]}")
    return path


def _evaluate(task: Task, state: RunState, step: int) -> None:
    metrics = task.evaluate(step, state.emas["ema"])
    if metrics:
        task.ctx.log({"step": step, **{f"eval_{k}": v for k, v in metrics.items()}})


def _show(task: Task, ema: nn.Module, step: int) -> None:
    """The task's progress picture (to TensorBoard too, when on), then the loss plot."""
    ctx = task.ctx
    with pictures_logged(ctx, step):
        task.show(step, ema)
    ctx.on_main("drawing the loss plot", lambda: plot_loss(ctx.run_dir / "log.jsonl", ctx.run_dir / "loss.png"))

