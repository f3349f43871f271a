"""``difflab train``, ``difflab train-classifier``, ...: one command per registered task, one flag per setting."""

from __future__ import annotations

import argparse
import dataclasses
import time
import typing

from difflab.tasks import TASKS
from difflab.training import loop
from difflab.training.config import RunConfig, fields_of, load_config_file
from difflab.training.runs import shell_quote
from difflab.training.task import Task


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{s}'")


def _add_flags(group, config_class: type, defaults: dict, derived: dict | None = None) -> None:
    """One flag per field (``model``-like dicts: config files only), with its default in the help; ``derived``
    fields (name -> why) are set by the task from its other settings."""
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        kinds = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
        if kinds[0] is dict or f.metadata.get("positional"):
            continue
        default = defaults.get(f.name, f.default)
        text = f.metadata["help"] + ("" if default is None else f" (default: {default})")
        if f.name in (derived or {}):
            text = f"set by this command: {derived[f.name]}"
        if f.metadata.get("frozen"):
            text += "; fixed on --resume"
        extra = ({"type": _parse_bool, "nargs": "?", "const": True, "metavar": "BOOL"} if kinds[0] is bool
                 else {"type": kinds[0], "metavar": f.metadata.get("metavar", f.name.split("_")[-1].upper())})
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=argparse.SUPPRESS, help=text, **extra)


def add_parsers(sub) -> None:
    for command, task in TASKS.items():
        p = sub.add_parser(command, help=task.summary, description=task.description, epilog=task.examples,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if task.positional:
            field = next(f for f in dataclasses.fields(task.config_class) if f.name == task.positional)
            p.add_argument(task.positional, nargs="?", default=argparse.SUPPRESS, metavar=field.metadata["metavar"],
                           help=field.metadata["help"])
        p.add_argument("--config", metavar="FILE", help="YAML or JSON file of options (flags override it)")
        p.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its newest checkpoint")
        p.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same --name")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        _add_flags(p.add_argument_group("run settings (every training command has them)"), RunConfig,
                   task.run_defaults, {k: task.derived_help for k in task.derived_fields})
        _add_flags(p.add_argument_group(f"{task.noun} settings"), task.config_class, {})
        p.set_defaults(handler=run_task, task=task)


def run_task(args: argparse.Namespace) -> int:
    task: type[Task] = args.task
    special = {"config", "resume", "overwrite", "quiet", "command", "handler", "task"}
    flags = {k: v for k, v in vars(args).items() if k not in special}
    data = load_config_file(args.config, fields_of(RunConfig, task.config_class)) if args.config else {}
    started = time.perf_counter()
    if args.resume:
        run = loop.train(task, resume=args.resume, progress=not args.quiet, **{**data, **flags})
    else:
        run = loop.train(task, {**data, **flags}, overwrite=args.overwrite, progress=not args.quiet)
    print(f"done in {(time.perf_counter() - started) / 60:.1f} min: {run}")
    print(task.report.format(run=run, run_arg=shell_quote(run)))
    return 0
