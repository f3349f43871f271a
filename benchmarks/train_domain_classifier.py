"""Train the small classifiers that difflab ships as domain feature extractors (difflab.metrics.domain).

    python benchmarks/train_domain_classifier.py                      # both: digits, fashion-mnist
    python benchmarks/train_domain_classifier.py --datasets digits --epochs 5 --out /tmp/clf

Training runs through difflab's one training loop (:mod:`difflab.training`) as a task defined here, so it has what
every run has: a run folder (``--runs``, default ``runs/``) with log, loss plot and checkpoints, exact resume,
Ctrl-C, torchrun. Then it writes ``classifier-<dataset>.safetensors`` (weights) and ``classifier-<dataset>.json``
(config, class names, held-out accuracy, training details) into ``src/difflab/assets`` (or ``--out``) and prints
a table. CPU only, a few minutes per dataset on one thread; the same seed and thread count give the same weights
on the same machine (other CPUs may round differently).
The held-out accuracy is measured through ``DomainExtractor.predict`` -- the code path users and the tests
run -- and the written files are reloaded and checked against it.

The shipped weights (2026-11-25) came from this script's earlier stand-alone loop (commit f1e0f49: per-epoch
permutations, OneCycleLR); the loop here orders data and schedules the rate as every difflab run does, so a rerun
gives different weights of similar accuracy (see the README).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from difflab import distributed
from difflab.data import to_model_range
from difflab.metrics.domain import DOMAIN_EXTRACTORS, DomainExtractor, load_domain_split
from difflab.nn import DomainClassifier, DomainClassifierConfig
from difflab.training import loop
from difflab.training.checkpoint import latest_valid_checkpoint, load_weights, write_json
from difflab.training.config import setting
from difflab.training.runs import batch_indices
from difflab.training.task import Task

ASSETS = Path(__file__).resolve().parents[1] / "src" / "difflab" / "assets"


@dataclass
class Recipe:
    """How one dataset's classifier is built and trained."""

    config: DomainClassifierConfig
    epochs: int                 # passes over the training split
    batch_size: int = 128
    lr: float = 3e-3            # AdamW peak learning rate (one-cycle: warm-up, then cosine to ~0)
    weight_decay: float = 5e-4  # AdamW decoupled weight decay
    shift: int = 2              # random translation by up to this many pixels (edges filled with background)
    hflip: bool = False         # random horizontal flips (clothes are left-right symmetric; digits are not)
    data_source: str = ""
    extra: dict = field(default_factory=dict)


RECIPES = {
    "fashion-mnist": Recipe(
        config=DomainClassifierConfig(image_size=28, in_channels=1, num_classes=10, channels=(16, 32, 64, 128),
                                      blocks=(1, 1, 1, 1), feature_dim=128, dropout=0.1),  # 28 -> 14 -> 7 -> 3
        epochs=10, batch_size=128, lr=3e-3, weight_decay=5e-4, shift=2, hflip=True,
        data_source="Fashion-MNIST (Xiao et al. 2017), official IDX files: 60,000 train / 10,000 test"),
    "digits": Recipe(
        config=DomainClassifierConfig(image_size=8, in_channels=1, num_classes=10, channels=(32, 64),
                                      blocks=(2, 2), feature_dim=128, dropout=0.3),  # 8 -> 4
        epochs=60, batch_size=64, lr=3e-3, weight_decay=0.05, shift=1, hflip=False,
        data_source="UCI optical digits 8x8 (bundled difflab/assets/digits.npz): first 1,437 train, last 360 test"),
}


def augment(x: torch.Tensor, *, shift: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``shift`` pixels (padding with -1, the background) and optional
    horizontal flips, each drawn per image: ``(N, C, H, W) -> (N, C, H, W)``."""
    n, _, h, w = x.shape
    if hflip:
        flip = torch.rand(n, generator=generator, device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if shift > 0:
        padded = F.pad(x, (shift,) * 4, value=-1.0)                       # (N, C, H + 2s, W + 2s)
        dy, dx = torch.randint(0, 2 * shift + 1, (2, n), generator=generator, device=x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (N, 1, H, 1)
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (N, 1, 1, W)
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]     # (1, C, 1, 1)
        x = padded[torch.arange(n, device=x.device)[:, None, None, None], chans, rows, cols]  # (N, C, H, W)
    return x


@dataclass
class DomainSettings:
    """The domain-classifier task's own settings: which recipe (dataset) and its augmentation."""

    domain: str = setting("digits", "which shipped classifier: digits or fashion-mnist", frozen=True)
    shift: int = setting(1, "random translation by up to this many pixels (edges filled with background)",
                         frozen=True)


class DomainBatch(NamedTuple):
    x: torch.Tensor       # augmented images in [-1, 1]
    labels: torch.Tensor


class DomainClassifierTask(Task):
    """Cross-entropy on augmented training images of a domain split (difflab.metrics.domain.load_domain_split)."""

    name, noun, command = "domain-classifier", "domain classifier", "python benchmarks/train_domain_classifier.py"
    config_class = DomainSettings
    folder_suffix = "-domain-classifier"

    def setup(self) -> torch.nn.Module:
        device = self.ctx.device
        train = load_domain_split(self.config.domain, "train")
        self.x, self.labels = to_model_range(train.images).to(device), train.labels.to(device)
        self.shard = slice(*distributed.shard_range(self.run.batch_size, self.ctx.dist.rank, self.ctx.dist.world_size))
        self.recipe = RECIPES[self.config.domain]
        _, channels, size, _ = train.images.shape
        self.run = dataclasses.replace(self.run, image_size=size, channels=channels)
        return DomainClassifier(self.recipe.config).to(device)

    def batch(self, step: int, generator: torch.Generator) -> DomainBatch:
        run = self.run
        idx = batch_indices(step, run.batch_size, len(self.x), run.seed).to(self.x.device)
        x = augment(self.x[idx], shift=self.config.shift, hflip=bool(run.hflip), generator=generator)
        return DomainBatch(x[self.shard], self.labels[idx][self.shard])

    def loss(self, net, b: DomainBatch):
        logits = net(b.x)  # (n, K)
        correct = (logits.argmax(1) == b.labels).float()
        return F.cross_entropy(logits, b.labels, reduction="none"), {"train_accuracy": correct}

    def model_config(self) -> dict:
        return {"format": "difflab-domain-classifier/1", "dataset": self.config.domain,
                "config": self.recipe.config.to_dict()}


def train_one(dataset: str, recipe: Recipe, *, seed: int, runs: Path) -> tuple[DomainClassifier, dict]:
    """Train from scratch through the training loop; returns the model (eval mode) and the training details."""
    steps = recipe.epochs * -(-len(load_domain_split(dataset, "train")) // recipe.batch_size)
    start = time.perf_counter()
    run = loop.train(DomainClassifierTask, dict(
        domain=dataset, shift=recipe.shift, dataset=dataset, hflip=recipe.hflip, steps=steps,
        batch_size=recipe.batch_size, lr=recipe.lr, lr_schedule="cosine", warmup=steps // 5,
        weight_decay=recipe.weight_decay, grad_clip=0.0, ema_decay=0.0, seed=seed, device="cpu", out=str(runs),
        name=f"{dataset}-domain-classifier", log_every=max(1, steps // 20), sample_every=0,
        checkpoint_every=steps), overwrite=True)
    model = DomainClassifier(recipe.config)
    model.load_state_dict(load_weights(latest_valid_checkpoint(run), "model"), strict=True)
    model.eval()
    details = {
        "epochs": recipe.epochs, "steps": steps, "batch_size": recipe.batch_size, "optimizer": "AdamW",
        "lr": recipe.lr, "lr_schedule": "20% linear warm-up, then cosine decay to 0 (difflab's training loop)",
        "weight_decay": recipe.weight_decay, "loss": "cross-entropy",
        "augmentation": f"random shift up to {recipe.shift}px" + (", horizontal flip" if recipe.hflip else ""),
        "seed": seed, "train_images": len(load_domain_split(dataset, "train")),
        "seconds": round(time.perf_counter() - start, 1), "date": datetime.date.today().isoformat(),
        "data_source": recipe.data_source, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "run": str(run),
    }
    return model, details


def held_out_accuracy(extractor: DomainExtractor, dataset: str) -> tuple[float, int]:
    test = load_domain_split(dataset, "test")
    predicted = extractor.predict(to_model_range(test.images))
    return float((predicted == test.labels).float().mean()), len(test)


def write_assets(dataset: str, model: DomainClassifier, meta: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"classifier-{dataset}.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, weights, metadata={"format": "pt", "dataset": dataset})
    config = out / f"classifier-{dataset}.json"
    write_json(config, meta)
    return weights, config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(DOMAIN_EXTRACTORS), choices=DOMAIN_EXTRACTORS)
    p.add_argument("--epochs", type=int, default=None, help="override every recipe's epochs (quick trials)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the shipped weights were trained so, and the float sums, hence "
                        "the weights, can differ in the last bits with another thread count)")
    p.add_argument("--out", type=Path, default=ASSETS, help=f"folder for the files (default {ASSETS})")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="folder for the training runs (default: runs)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    rows = []
    for dataset in args.datasets:
        recipe = RECIPES[dataset]
        if args.epochs is not None:
            recipe.epochs = args.epochs
        print(f"training the {dataset} classifier ({recipe.epochs} epochs)", flush=True)
        model, details = train_one(dataset, recipe, seed=args.seed, runs=args.runs)
        test = load_domain_split(dataset, "test")
        extractor = DomainExtractor(model, dataset=dataset, class_names=test.class_names, test_accuracy=float("nan"))
        accuracy, n_test = held_out_accuracy(extractor, dataset)
        meta = {
            "format": "difflab-domain-classifier/1",
            "dataset": dataset,
            "config": recipe.config.to_dict(),
            "class_names": test.class_names,
            "test_accuracy": round(accuracy, 6),
            "test_images": n_test,
            "test_split": ("official test split" if dataset == "fashion-mnist"
                           else "last 360 of the 1,797 bundled digits (indices 1437..1796)"),
            "parameters": sum(p.numel() for p in model.parameters()),
            "comparable_to_papers": False,
            "note": "domain features for FID/KID/IS-style metrics; not comparable with Inception FID in papers",
            "training": details,
            "command": " ".join(["python benchmarks/train_domain_classifier.py", *(sys.argv[1:] if argv is None else argv)]),
        }
        weights, config = write_assets(dataset, model, meta, args.out)
        # Reload what was written and measure again: the stored accuracy must be what users will get.
        reloaded = DomainClassifier(DomainClassifierConfig.from_dict(json.loads(config.read_text())["config"]))
        reloaded.load_state_dict(load_file(weights), strict=True)
        again, _ = held_out_accuracy(DomainExtractor(reloaded, dataset=dataset, class_names=test.class_names,
                                                     test_accuracy=accuracy), dataset)
        assert abs(again - accuracy) < 1e-9, f"reloaded classifier scores {again}, trained one {accuracy}"
        rows.append((dataset, meta["parameters"], os.path.getsize(weights), details["epochs"], details["seconds"],
                     accuracy))

    print(f"\n{'dataset':<15}{'params':>9}{'weights KB':>12}{'epochs':>8}{'train s':>9}{'test acc':>10}")
    for dataset, params, size, epochs, seconds, accuracy in rows:
        print(f"{dataset:<15}{params:>9,}{size / 1024:>12.1f}{epochs:>8}{seconds:>9.0f}{accuracy:>10.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
