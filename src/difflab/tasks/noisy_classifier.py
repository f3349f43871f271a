"""Noise-aware classifiers for classifier guidance (Dhariwal & Nichol 2021, §4; tutorial §8.2 "分类器引导"),
the task behind ``difflab train-classifier``.

A classifier p_phi(y | x_t, t) is trained with cross-entropy on noisy images x_t ~ q(x_t | x_0) at uniformly drawn
timesteps, so its gradient grad_x log p_phi(y | x_t) can steer a diffusion sampler
(:func:`difflab.guidance.classifier_guidance`):

    run = difflab.train_classifier(dataset="digits", steps=2000)     # -> run folder (+ accuracy table)
    clf = difflab.load_classifier(run)                                # a NoisyClassifier: clf(x, sigma) -> logits

The network is the U-Net's contracting path with a pooling head (:class:`difflab.nn.UNetClassifier`). It trains on
DDPM's x_t = q_sample(x0, t, n) and the integer timestep t, exactly as Dhariwal & Nichol's; at sampling time
:class:`difflab.models.NoisyClassifier` gives it the same input from sigma coordinates through the VP
parameterization (c_in x = x_t, c_noise = t; tested equal). Its progress picture is ``accuracy.png`` (with
``accuracy.json``): held-out accuracy at each noise level.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from difflab.data import to_model_range
from difflab.errors import DifflabError
from difflab.models import classifier_config
from difflab.nn import UNetClassifier, unet_config
from difflab.schedules import NoiseSchedule, make_schedule, q_sample
from difflab.tasks.images import load_training_images
from difflab.training import loop
from difflab.training.checkpoint import write_json
from difflab.training.config import setting
from difflab.training.runs import batch_indices, random_hflip
from difflab.training.task import Task
from difflab.viz import plot_accuracy

# timesteps (as fractions of T) at which the accuracy table is measured
ACCURACY_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass
class NoisyClassifierConfig:
    """The settings of a noise-aware classifier besides the shared ones. Train it on the same data, image size,
    schedule and timesteps as the diffusion model it will guide."""

    preset: str = setting("tiny", "network size: the contracting path of this U-Net preset (tiny, small, "
                                  "ddpm-cifar10)", frozen=True)
    model: dict = setting(dict, "network config overrides (config file only)", frozen=True)
    schedule: str = setting("linear", "noise schedule the classifier is trained under: use the diffusion model's",
                            frozen=True)
    timesteps: int = setting(1000, "number of diffusion steps T: use the diffusion model's", frozen=True)
    holdout: float = setting(0.1, "fraction of the images held out to measure accuracy at each noise level",
                             frozen=True)


class ClassifierBatch(NamedTuple):
    x0: torch.Tensor      # clean images in [-1, 1] (n, C, H, W)
    labels: torch.Tensor  # (n,)
    t: torch.Tensor       # timesteps (n,)
    noise: torch.Tensor   # like x0


class NoisyClassifierTask(Task):
    """Cross-entropy of p(y | x_t, t) on x_t ~ q(x_t | x_0), t ~ U{1..T}."""

    name, noun, command = "noisy-classifier", "classifier", "difflab train-classifier"
    config_class = NoisyClassifierConfig
    run_defaults = dict(lr=1e-3, warmup=100, weight_decay=0.05, keep=2)
    folder_suffix = "-classifier"
    summary = "train a noise-aware classifier for classifier guidance"
    description = ("Train p(y | x_t, t), the U-Net's contracting path with a pooling head, on noisy images at every "
                   "noise level (Dhariwal & Nichol 2021; tutorial §8.2), for classifier guidance.")
    examples = """examples:
  difflab train-classifier                                  # on the bundled digits (CPU, about a minute)
  difflab train-classifier --dataset fashion-mnist --preset small --steps 20000
  difflab sample runs/digits --classifier runs/digits-classifier --class 7 --classifier-scale 2

Train it on the same data, image size, schedule and timesteps as the diffusion model it will guide.
The run folder holds accuracy.json / accuracy.png: held-out accuracy at each noise level."""
    report = ("accuracy by noise level: {run}/accuracy.png\n"
              "guide a model with: difflab sample RUN --classifier {run_arg} --class all")

    @classmethod
    def check(cls, run, cfg: NoisyClassifierConfig) -> None:
        if not 0.0 < cfg.holdout < 1.0:
            raise DifflabError(f"--holdout must lie in (0, 1), got {cfg.holdout}")
        if "num_classes" in cfg.model:
            raise DifflabError("a noise-aware classifier takes no class labels as input (remove model.num_classes)")
        make_schedule(cfg.schedule, cfg.timesteps)

    def setup(self) -> nn.Module:
        cfg, ctx = self.config, self.ctx
        data, self.run = load_training_images(self.run, ctx)
        if data.labels is None:
            raise DifflabError(f"'{self.run.dataset}' has no labels: a classifier needs a named dataset or a folder "
                               "with one subfolder per class")
        n_all, channels, size, _ = data.images.shape
        order = torch.randperm(n_all, generator=torch.Generator().manual_seed(self.run.seed))  # a seeded split
        n_held = max(1, int(round(cfg.holdout * n_all)))
        self.train_idx, self.held_idx = order[n_held:].to(ctx.device), order[:n_held]
        self.data, self.images, self.labels = data, data.images.to(ctx.device), data.labels.to(ctx.device)
        self.schedule = make_schedule(cfg.schedule, cfg.timesteps)
        self.unet = unet_config(cfg.preset, image_size=size, in_channels=channels, **cfg.model)
        self.shard = ctx.shard(self.run.batch_size)
        return UNetClassifier(self.unet, len(data.class_names)).to(ctx.device)

    def batch(self, step: int, generator: torch.Generator) -> ClassifierBatch:
        run, device = self.run, self.ctx.device
        idx = self.train_idx[batch_indices(step, run.batch_size, len(self.train_idx), run.seed, device)]
        x0, labels = to_model_range(self.images[idx]), self.labels[idx]
        if run.hflip:
            x0 = random_hflip(x0, generator)
        t = torch.randint(0, self.schedule.T, (x0.shape[0],), generator=generator, device=device)
        noise = torch.randn(x0.shape, generator=generator, device=device)
        s = self.shard
        return ClassifierBatch(x0[s], labels[s], t[s], noise[s])

    def loss(self, net, b: ClassifierBatch):
        logits = net(q_sample(b.x0, b.t, b.noise, self.schedule), b.t.float())  # (n, K) of p(y | x_t, t)
        correct = (logits.argmax(1) == b.labels).float()
        return nn.functional.cross_entropy(logits.float(), b.labels, reduction="none"), {"train_accuracy": correct}

    def model_config(self) -> dict:
        return classifier_config(self.unet, class_names=self.data.class_names, schedule=self.schedule,
                                 data={"name": self.data.name, "channels": self.unet.in_channels,
                                       "image_size": self.unet.image_size})

    def accuracy_table(self, step: int, ema) -> dict:
        """Held-out accuracy of the EMA at each noise level, measured once per step (evaluation and the picture of
        the same step share it): the content of accuracy.json."""
        if getattr(self, "_table", {}).get("step") != step:
            held = self.held_idx.to(self.ctx.device)
            rows = accuracy_by_noise_level(ema, self.schedule, self.images[held], self.labels[held], seed=self.run.seed)
            chance = float(torch.bincount(self.data.labels[self.held_idx]).max()) / len(self.held_idx)
            self._table = {"step": step, "held_out": len(self.held_idx), "chance": chance, "rows": rows}
        return self._table

    def evaluate(self, step: int, ema) -> dict[str, float]:
        result: dict[str, float] = {}

        def measure() -> None:  # the main process only: the other ones would compute the same for nothing
            rows = self.accuracy_table(step, ema)["rows"]
            result["heldout_accuracy"] = sum(r["accuracy"] for r in rows) / len(rows)

        self.ctx.on_main("measuring the held-out accuracy", measure)
        return result

    def show(self, step: int, ema) -> None:
        """accuracy.json and accuracy.png: held-out accuracy at each noise level (main process)."""
        def draw() -> None:
            table = self.accuracy_table(step, ema)
            write_json(self.ctx.run_dir / "accuracy.json", table)
            plot_accuracy(table["rows"], table["chance"], self.ctx.run_dir / "accuracy.png")

        self.ctx.on_main("measuring the held-out accuracy", draw)

    def finish(self, ema) -> None:
        table = getattr(self, "_table", None)  # the final picture's (absent if it could not be drawn)
        if self.ctx.progress and table is not None:
            print(f"held-out accuracy of {self.ctx.run_dir.name} by noise level ({table['held_out']} images):")
            print(format_accuracy_table(table["rows"], table["chance"]))


@torch.no_grad()
def accuracy_by_noise_level(net: UNetClassifier, schedule: NoiseSchedule, images: torch.Tensor, labels: torch.Tensor,
                            *, batch_size: int = 512, seed: int = 0) -> list[dict]:
    """Top-1 accuracy on (held-out) uint8 images noised to several timesteps: rows of t, sigma, accuracy."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    rows = []
    for frac in ACCURACY_FRACTIONS:
        t_int = min(schedule.T - 1, round(frac * (schedule.T - 1)))
        gen = torch.Generator().manual_seed(seed)
        correct = 0
        for start in range(0, len(images), batch_size):
            x0 = to_model_range(images[start:start + batch_size].to(device))
            noise = torch.randn(x0.shape, generator=gen).to(device)
            t = torch.full((x0.shape[0],), t_int, device=device)
            logits = net(q_sample(x0, t, noise, schedule), t.float())
            correct += int((logits.argmax(1) == labels[start:start + batch_size].to(device)).sum())
        rows.append({"t": t_int, "sigma": float(schedule.sigmas[t_int]), "accuracy": correct / len(images)})
    net.train(was_training)
    return rows


def format_accuracy_table(rows: list[dict], chance: float) -> str:
    lines = [f"{'t':>6} {'sigma':>10} {'accuracy':>9}"]
    lines += [f"{r['t']:>6} {r['sigma']:>10.3f} {r['accuracy']:>9.3f}" for r in rows]
    lines.append(f"(chance: {chance:.3f})")
    return "\n".join(lines)


def train_classifier(config: dict | None = None, *, resume: str | Path | None = None, overwrite: bool = False,
                     progress: bool = True, **overrides) -> Path:
    """Train a noise-aware classifier; returns its run folder (config.json, log.jsonl, accuracy.json with the
    held-out accuracy at each noise level, accuracy.png, checkpoints/). ``resume`` continues a run exactly."""
    return loop.train(NoisyClassifierTask, config, resume=resume, overwrite=overwrite, progress=progress, **overrides)

