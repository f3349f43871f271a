"""The training configuration: one dataclass, readable from flags, YAML or JSON, saved with every run."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from difflab.errors import DifflabError


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults train the tiny U-Net on the bundled 8x8 digits on a CPU
    in a few minutes; every field is a ``difflab train`` flag (underscores become dashes)."""

    # data
    dataset: str = _opt("digits", "dataset name (digits, fashion-mnist, mnist, cifar10) or a folder of images")
    data_dir: str | None = _opt(None, "where to look for dataset files before downloading them")
    image_size: int | None = _opt(None, "train at this square size (default: the dataset's own; a folder: its images' common square size, else 64)")
    channels: int | None = _opt(None, "1 (grayscale) or 3 (RGB) (default: the dataset's own; a folder: 3)")
    hflip: bool | None = _opt(None, "random horizontal flips (default: on for photos, off for digits and MNIST-like data)")
    # model
    preset: str = _opt("tiny", "U-Net size preset: tiny, small, ddpm-cifar10")
    model: dict = field(default_factory=dict, metadata={"help": "U-Net config overrides, e.g. {base_channels: 48} (config file only)"})
    prediction: str = _opt("eps", "what the network predicts: eps (the tutorial's noise), x0 or v")
    weighting: str | None = _opt(None, "loss weighting: eps, x0 or v (default: the same as --prediction, i.e. plain MSE on the output)")
    schedule: str = _opt("linear", "noise schedule: linear, cosine, quadratic, sigmoid")
    timesteps: int = _opt(1000, "number of diffusion steps T")
    conditional: bool = _opt(False, "class-conditional: the U-Net also sees the dataset's labels (needs labelled data: "
                                    "a named dataset or a folder with one subfolder per class)")
    label_dropout: float = _opt(0.1, "conditional: fraction of labels replaced by the learned null class, so one model "
                                     "is conditional and unconditional (needed for classifier-free guidance)")
    guidance_scale: float = _opt(3.0, "conditional: classifier-free guidance scale of the sample grids "
                                      "(0 = unconditional, 1 = conditional, >1 = stronger)")
    # optimisation
    steps: int = _opt(2000, "training steps (optimizer updates); 2000 suit the bundled digits, real datasets want 20k-800k")
    batch_size: int = _opt(128, "images per step")
    lr: float = _opt(2e-3, "peak AdamW learning rate")
    warmup: int = _opt(200, "linear learning-rate warm-up steps")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    grad_clip: float = _opt(1.0, "clip the gradient norm to this value (0 = off)")
    ema_decay: float = _opt(0.999, "decay of the exponential moving average of the weights used for sampling")
    max_bad_steps: int = _opt(20, "stop (with a checkpoint) after this many non-finite steps in a row; each one is "
                                  "skipped, counted and logged (0 = never stop)")
    # runtime
    device: str = _opt("auto", "cpu, cuda, cuda:1, ... (auto: cuda if available)")
    compile: bool = _opt(False, "torch.compile the U-Net (GPU; pays off for long runs)")
    seed: int = _opt(0, "random seed for initialisation, data order and noise")
    # outputs
    out: str = _opt("runs", "folder that holds run folders")
    name: str | None = _opt(None, "run folder name (default: the dataset name, numbered if taken)")
    log_every: int = _opt(50, "log loss and speed every N steps")
    sample_every: int = _opt(1000, "write a sample grid from a fixed seed every N steps (0 = only at the end)")
    checkpoint_every: int = _opt(1000, "write a checkpoint every N steps (and always at the end)")
    keep: int = _opt(3, "keep the newest N checkpoints")
    num_samples: int = _opt(64, "images in each sample grid")
    eval_every: int = _opt(0, "compute metrics of generated samples every N steps, logged and plotted (0 = off)")
    eval_samples: int = _opt(1000, "generated images per evaluation (DDIM, 50 steps, EMA weights)")
    eval_metrics: str = _opt("fid", "metrics to log during training, comma-separated: fid, kid, is, pr")
    eval_features: str | None = _opt(None, "feature extractor for evaluation (default: the shipped classifier for digits and fashion-mnist, else inception)")
    sample_steps: int = _opt(50, "DDIM steps for the sample grids")

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
        if value is None and type(None) in allowed:
            continue
        if isinstance(value, bool) and bool not in allowed:
            raise DifflabError(f"config '{f.name}' must be {_type_names(allowed)}, got {value!r}")
        if not isinstance(value, allowed):
            raise DifflabError(f"config '{f.name}' must be {_type_names(allowed)}, got {value!r}")


def check_counts_and_seed(cfg, counts: tuple[str, ...]) -> None:
    """One-line errors for a count below 1 (steps, batch size, ...) or a seed outside [0, 2^62)."""
    for name in counts:
        if getattr(cfg, name) < 1:
            raise DifflabError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if not 0 <= cfg.seed < 2**62:
        raise DifflabError(f"--seed must lie in [0, 2^62), got {cfg.seed}")


def _type_names(types) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def load_config_file(path: str | Path, config_class: type = None) -> dict:
    """Read a YAML or JSON config file into a dict of ``config_class`` (default TrainConfig) fields; unknown
    keys are refused."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise DifflabError(f"cannot read config file '{path}': {e.strerror}") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:
        raise DifflabError(f"config file '{path}' is not valid {path.suffix.lstrip('.').upper() or 'YAML'}: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DifflabError(f"config file '{path}' must hold a mapping of option names to values")
    check_keys(data, f"config file '{path}'", config_class)
    return data


def check_keys(data: dict, where: str, config_class: type = None) -> None:
    known = {f.name for f in dataclasses.fields(config_class or TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise DifflabError(f"{where}: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")


def make_config(data: dict | None = None, *, config_class: type = None, **overrides):
    """A TrainConfig (or ``config_class``) from a dict and keyword overrides, with one-line errors for unknown
    keys or bad types."""
    config_class = config_class or TrainConfig
    merged = {**(data or {}), **overrides}
    check_keys(merged, "training config", config_class)
    return config_class(**merged)


@dataclass
class ClassifierTrainConfig:
    """A noise-aware classifier for classifier guidance (``difflab train-classifier``): the U-Net's encoder half
    with a pooling head, trained with cross-entropy on noisy images x_t at uniformly drawn timesteps."""

    dataset: str = _opt("digits", "a labelled dataset: digits, fashion-mnist, mnist, cifar10, or a folder with one subfolder per class")
    data_dir: str | None = _opt(None, "where to look for dataset files before downloading them")
    image_size: int | None = _opt(None, "square size (default: the dataset's own); use the diffusion model's")
    channels: int | None = _opt(None, "1 or 3 (default: the dataset's own); use the diffusion model's")
    hflip: bool | None = _opt(None, "random horizontal flips (default: on for photos only)")
    preset: str = _opt("tiny", "encoder size: the first half of this U-Net preset (tiny, small, ddpm-cifar10)")
    model: dict = field(default_factory=dict, metadata={"help": "encoder config overrides (config file only)"})
    schedule: str = _opt("linear", "noise schedule the classifier is trained under: use the diffusion model's")
    timesteps: int = _opt(1000, "number of diffusion steps T: use the diffusion model's")
    steps: int = _opt(2000, "training steps")
    batch_size: int = _opt(128, "images per step")
    lr: float = _opt(1e-3, "peak AdamW learning rate")
    warmup: int = _opt(100, "linear learning-rate warm-up steps")
    weight_decay: float = _opt(0.05, "AdamW weight decay")
    grad_clip: float = _opt(1.0, "clip the gradient norm to this value (0 = off)")
    holdout: float = _opt(0.1, "fraction of the images held out to measure accuracy at each noise level")
    device: str = _opt("auto", "cpu, cuda, cuda:1, ... (auto: cuda if available)")
    seed: int = _opt(0, "random seed for initialisation, data order, split and noise")
    out: str = _opt("runs", "folder that holds run folders")
    name: str | None = _opt(None, "run folder name (default: <dataset>-classifier, numbered if taken)")
    log_every: int = _opt(50, "log loss and accuracy every N steps")
    checkpoint_every: int = _opt(1000, "write a checkpoint every N steps (and always at the end)")
    keep: int = _opt(2, "keep the newest N checkpoints")

    def __post_init__(self):
        check_types(self)
