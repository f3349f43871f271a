"""Training settings: what every run shares (:class:`RunConfig`) and, beside it, each task's own dataclass.

Every field is a flag of the task's command (underscores become dashes) and a key of a YAML or JSON config
file; both parts are saved in the run folder's ``config.json``. A field declared with ``frozen=True`` describes
the model or the data: it cannot change when a run is resumed (it would no longer be the same run).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from difflab.errors import DifflabError
from difflab.extras import require

LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "bf16", "fp32")  # devices.autocast
LOGGERS = ("jsonl", "tensorboard")  # log.jsonl is always written; tensorboard adds event files beside it


def setting(default, help: str, *, frozen: bool = False, **kw):
    """A config field with its ``--help`` text; ``frozen`` fields cannot change on resume."""
    factory = {"default_factory": default} if callable(default) else {"default": default}
    return field(**factory, metadata={"help": help, "frozen": frozen, **kw})


@dataclass
class RunConfig:
    """What every training task shares: data, optimisation, runtime and outputs. The defaults suit the bundled
    8x8 digits on a CPU; a task may default some of them differently (``Task.run_defaults``)."""

    # data
    dataset: str = setting("digits", "dataset name (digits, fashion-mnist, mnist, cifar10; shapes: procedural and "
                                     "captioned) or a folder of images (captioned by a metadata.jsonl or .txt files)",
                           frozen=True)
    data_dir: str | None = setting(None, "where to look for dataset files before downloading them")
    image_size: int | None = setting(None, "train at this square size (default: the dataset's own; a folder: its "
                                           "images' common square size, else 64)", frozen=True)
    channels: int | None = setting(None, "1 (grayscale) or 3 (RGB) (default: the dataset's own; a folder: 3)",
                                   frozen=True)
    hflip: bool | None = setting(None, "random horizontal flips (default: on for photos, off for digits and "
                                       "MNIST-like data)", frozen=True)
    # optimisation
    steps: int = setting(2000, "training steps (batches; a skipped non-finite step counts); 2000 suit the bundled "
                               "digits, real datasets want 20k-800k")
    batch_size: int = setting(128, "images per step, over all processes", frozen=True)
    lr: float = setting(2e-3, "peak AdamW learning rate, in (0, 1]")
    lr_schedule: str = setting("constant", "after the warm-up: constant (as in DDPM) or cosine (a half cosine to 0 "
                                           "at --steps; raising --steps on resume stretches it)")
    warmup: int = setting(200, "linear learning-rate warm-up steps")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    grad_clip: float = setting(1.0, "clip the gradient norm to this value (0 = off)")
    ema_decay: float = setting(0.999, "decay of the exponential moving average of the weights (what is sampled and "
                                      "loaded)")
    max_bad_steps: int = setting(20, "stop (with a checkpoint) after this many non-finite steps in a row; each one "
                                     "is skipped, counted and logged (0 = never stop)")
    # runtime
    device: str = setting("auto", "cpu, cuda, cuda:1, ... (auto: cuda if available)")
    precision: str = setting("auto", "auto (bf16 autocast on a GPU, float32 on a CPU), bf16 (autocast, also on a CPU) "
                                     "or fp32", metavar="auto|bf16|fp32")
    compile: bool | None = setting(None, "torch.compile the network's training step (default: on a GPU, where it is "
                                         "faster after a warm-up of about a minute; off on a CPU)")
    seed: int = setting(0, "random seed for initialisation, data order and noise", frozen=True)
    # outputs
    out: str = setting("runs", "folder that holds run folders")
    name: str | None = setting(None, "run folder name (default: from the dataset name, numbered if taken)")
    log_every: int = setting(50, "log loss and speed every N steps")
    sample_every: int = setting(1000, "draw the progress picture (e.g. a sample grid) every N steps (0 = only at "
                                      "the end)")
    checkpoint_every: int = setting(1000, "write a checkpoint every N steps (and always at the end)")
    keep: int = setting(3, "keep the newest N checkpoints (0 = keep every one)")
    eval_every: int = setting(0, "evaluate (e.g. FID of samples) every N steps, logged and plotted (0 = off)")
    logger: str = setting("jsonl", "jsonl: log.jsonl only; tensorboard: also TensorBoard event files in "
                                   "RUN/tensorboard/ (every logged value and progress picture; view all runs with "
                                   "tensorboard --logdir runs; needs pip install 'difflab[tensorboard]')",
                          metavar="jsonl|tensorboard")

    def __post_init__(self):
        check_types(self)


def check_types(cfg) -> None:
    """Refuse wrong types with one line each (a YAML typo should not become a stack trace mid-run)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        allowed = typing.get_args(hints[f.name]) or (hints[f.name],)
        allowed = tuple(a for a in allowed if isinstance(a, type))
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            setattr(cfg, f.name, float(value))
            continue
        if (int in allowed and float not in allowed and isinstance(value, float) and math.isfinite(value)
                and value.is_integer()):  # steps: 1e5
            setattr(cfg, f.name, int(value))
            continue
        if value is None and type(None) in allowed:
            continue
        if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise DifflabError(f"config '{f.name}' must be {names}, got {value!r}")


def check_run(run: RunConfig) -> None:
    """One-line errors for shared settings out of range."""
    for name in ("steps", "batch_size", "log_every", "checkpoint_every"):
        if getattr(run, name) < 1:
            raise DifflabError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(run, name)}")
    for name in ("warmup", "sample_every", "eval_every", "max_bad_steps", "keep"):
        if getattr(run, name) < 0:
            raise DifflabError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(run, name)}")
    if not 0 <= run.seed < 2**62:
        raise DifflabError(f"--seed must lie in [0, 2^62), got {run.seed}")
    if not (math.isfinite(run.lr) and 0 < run.lr <= 1):  # AdamW moves each weight by up to about lr per step
        raise DifflabError(f"--lr must lie in (0, 1] (AdamW rates are typically 1e-4 to 1e-2), got {run.lr}")
    for name in ("weight_decay", "grad_clip"):
        if not (math.isfinite(getattr(run, name)) and getattr(run, name) >= 0):
            raise DifflabError(f"--{name.replace('_', '-')} must be a number >= 0, got {getattr(run, name)}")
    if run.lr * run.weight_decay >= 1:  # AdamW multiplies every weight by 1 - lr * weight_decay each step
        raise DifflabError(f"--weight-decay times --lr must stay below 1 (AdamW scales the weights by 1 - lr * "
                           f"weight_decay each step), got {run.weight_decay} x {run.lr}")
    if not 0.0 <= run.ema_decay < 1.0:
        raise DifflabError(f"--ema-decay must lie in [0, 1), got {run.ema_decay}")
    from difflab.training.runs import check_run_name  # runs imports this module

    check_run_name(run.name)
    if run.lr_schedule not in LR_SCHEDULES:
        raise DifflabError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got '{run.lr_schedule}'")
    if run.precision not in PRECISIONS:
        raise DifflabError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{run.precision}'")
    if run.logger not in LOGGERS:
        raise DifflabError(f"--logger must be one of {', '.join(LOGGERS)}, got '{run.logger}'")
    if run.logger == "tensorboard":  # now, not after the data is loaded and the first steps are trained
        require("torch.utils.tensorboard", extra="tensorboard", feature="--logger tensorboard")


def fields_of(*config_classes: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for cls in config_classes for f in dataclasses.fields(cls)}


def frozen_fields(*config_classes: type) -> list[str]:
    """The fields that cannot change on resume, in declaration order."""
    return [name for name, f in fields_of(*config_classes).items() if f.metadata.get("frozen")]


def check_keys(data: dict, where: str, known) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise DifflabError(f"{where}: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")


def load_config_file(path: str | Path, known) -> dict:
    """Read a YAML or JSON config file into a dict of options; keys outside ``known`` are refused."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DifflabError(f"cannot read config file '{path}': {getattr(e, 'strerror', None) or e}") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = _yaml_load(text)
    except Exception as e:
        kind = path.suffix.lstrip(".").upper() or "YAML"
        raise DifflabError(f"config file '{path}' is not valid {kind}: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DifflabError(f"config file '{path}' must hold a mapping of option names to values")
    if "task" in data and "run" in data:  # a run folder's config.json: start a new run with its settings
        data = from_json(data, path)[1]
    check_keys(data, f"config file '{path}'", known)
    return data


def _yaml_load(text: str):
    """YAML with numbers read the way Python and JSON write them: PyYAML follows YAML 1.1, where ``1e-4`` (no dot)
    is a string; YAML 1.2 and every person writing a learning rate mean a float."""
    import re

    import yaml  # only config files need it

    class Loader(yaml.SafeLoader):
        pass

    number = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", number, list("-+0123456789."))
    return yaml.load(text, Loader=Loader)


def make_configs(run_defaults: dict, task_class: type, data: dict | None = None, **overrides):
    """(RunConfig, task config) from one flat dict of options plus keyword overrides: each key goes to the
    dataclass that declares it; ``run_defaults`` are the task's own defaults for shared settings."""
    merged = {**(data or {}), **overrides}
    run_names, task_names = fields_of(RunConfig), fields_of(task_class)
    check_keys(merged, "training config", {**run_names, **task_names})
    run = RunConfig(**{**run_defaults, **{k: v for k, v in merged.items() if k in run_names}})
    return run, task_class(**{k: v for k, v in merged.items() if k in task_names})


def to_json(task_name: str, run: RunConfig, task_config) -> dict:
    """A run folder's config.json: the task, the shared settings, and the task's own settings beside them."""
    return {"task": task_name, "run": dataclasses.asdict(run), task_name: dataclasses.asdict(task_config)}


def from_json(data, where: Path) -> tuple[str, dict]:
    """(task name, flat dict of options) from a run folder's config.json. Run folders written before tasks
    existed hold one flat dict: a noise-aware classifier's has a ``holdout``, a diffusion model's not."""
    if not isinstance(data, dict) or not data:
        raise DifflabError(f"{where} does not hold a run configuration (a JSON object of settings); restore it or "
                           "start over with --overwrite")
    if "task" not in data:
        task, settings = ("noisy-classifier" if "holdout" in data else "diffusion"), dict(data)
    else:
        task = data["task"]
        if not isinstance(task, str) or not isinstance(data.get("run"), dict) or not isinstance(data.get(task), dict):
            raise DifflabError(f"{where} is damaged: it names task {task!r} but lacks its 'run' or '{task}' settings")
        settings = {**data["run"], **data[task]}
    # every difflab version wrote these; without them a run would silently go on with other data or batches
    missing = [k for k in frozen_fields(RunConfig) if k not in settings]
    if missing:
        raise DifflabError(f"{where} is damaged: it lacks the run's {', '.join(missing)}; restore it or start over "
                           "with --overwrite")
    return task, settings
