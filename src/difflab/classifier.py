"""Noise-aware classifiers for classifier guidance (Dhariwal & Nichol 2021, §4; tutorial §8.2 "分类器引导").

A classifier p_phi(y | x_t, t) is trained on noisy images at every noise level, so its gradient
grad_x log p_phi(y | x_t) can steer a diffusion sampler (see :func:`difflab.guidance.classifier_guidance`):

    run = difflab.train_classifier(dataset="digits", steps=2000)     # -> run folder (+ accuracy table)
    clf = difflab.load_classifier(run)                                # a NoisyClassifier: clf(x, sigma) -> logits

The network is the U-Net's encoder half with a pooling head (:class:`difflab.nn.EncoderClassifier`). Like the
denoiser it is used in sigma coordinates: it sees ``x_t = x / sqrt(1 + sigma^2)`` and the timestep of sigma.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from difflab.checkpoint import (
    CheckpointWriteError,
    latest_valid_checkpoint,
    load_state,
    load_training_state,
    load_weights,
    optimizer_from_tensors,
    optimizer_to_tensors,
    read_config,
    resolve_checkpoint,
    save_checkpoint,
    write_json,
)
from difflab.config import ClassifierTrainConfig, check_counts_and_seed, make_config
from difflab.data import load_dataset, to_model_range
from difflab.errors import DifflabError
from difflab.nn import EncoderClassifier, UNetConfig, unet_config
from difflab.pipeline import resolve_device
from difflab.runs import (
    GracefulStop,
    batch_indices,
    default_hflip,
    learning_rate,
    prepare_run_dir,
    random_hflip,
    restore_noise_generator,
    step_seed,
    truncate_log,
)
from difflab.schedules import NoiseSchedule, make_schedule, q_sample, sigma_to_t

CLASSIFIER_FORMAT = "difflab-classifier-1"
# timesteps (as fractions of T) at which the accuracy table is measured
ACCURACY_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class NoisyClassifier(nn.Module):
    """``clf(x, sigma) -> logits (N, K)`` of p(y | x, sigma) for x = x0 + sigma * noise (sigma coordinates).

    Wraps an :class:`EncoderClassifier` trained on DDPM's x_t: the input is scaled by 1 / sqrt(1 + sigma^2)
    and sigma mapped to its (interpolated) timestep, exactly as :class:`difflab.denoisers.Denoiser` does."""

    def __init__(self, net: EncoderClassifier, schedule: NoiseSchedule, class_names: list[str]):
        super().__init__()
        self.net, self.schedule, self.class_names = net, schedule, list(class_names)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1).expand(x.shape[0])
        c_in = (1 + sigma**2).rsqrt().view(-1, 1, 1, 1)
        return self.net(c_in * x, sigma_to_t(sigma, self.schedule).to(torch.float32)).float()


def classifier_config(encoder: UNetConfig, *, class_names: list[str], schedule: str, timesteps: int, data: dict) -> dict:
    """The JSON that rebuilds a trained noise-aware classifier (config.json of its checkpoints)."""
    return {"format": CLASSIFIER_FORMAT, "encoder": dataclasses.asdict(encoder), "class_names": list(class_names),
            "schedule": {"name": schedule, "timesteps": timesteps}, "data": data}


def load_classifier(path: str | Path, *, device: str | torch.device = "cpu") -> NoisyClassifier:
    """Load a classifier run folder (its newest checkpoint) or checkpoint folder."""
    checkpoint = resolve_checkpoint(path)
    config = read_config(checkpoint)
    if config.get("format") != CLASSIFIER_FORMAT:
        raise DifflabError(f"'{path}' is not a noise-aware classifier (train one with: difflab train-classifier)")
    try:
        net = EncoderClassifier(UNetConfig(**config["encoder"]), len(config["class_names"]))
        schedule = make_schedule(config["schedule"]["name"], config["schedule"]["timesteps"])
    except (KeyError, TypeError) as e:
        raise DifflabError(f"classifier config in {checkpoint} is incomplete or has unknown fields: {e}") from None
    load_state(net, load_weights(checkpoint, "model"), checkpoint)
    return NoisyClassifier(net, schedule, config["class_names"]).to(device).eval()


@torch.no_grad()
def accuracy_by_noise_level(net: EncoderClassifier, schedule: NoiseSchedule, images: torch.Tensor, labels: torch.Tensor,
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


def train_classifier(config: ClassifierTrainConfig | dict | None = None, *, resume: str | Path | None = None,
                     overwrite: bool = False, progress: bool = True, **overrides) -> Path:
    """Train a noise-aware classifier; returns its run folder (config.json, log.jsonl, accuracy.json with the
    held-out accuracy at each noise level, accuracy.png, checkpoints/). ``resume`` continues a run exactly."""
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.json").is_file():
            raise DifflabError(f"cannot resume: '{run_dir}' is not a run folder (no config.json)")
        stored = json.loads((run_dir / "config.json").read_text())
        if "holdout" not in stored:
            raise DifflabError(f"'{run_dir}' is not a classifier run (resume a diffusion run with: difflab train --resume)")
        saved = make_config(stored, config_class=ClassifierTrainConfig)
        changeable = ("steps", "device", "log_every", "checkpoint_every", "keep")
        changed = sorted(k for k, v in overrides.items() if k not in changeable and v is not None
                         and getattr(saved, k, v) != v)
        if changed:
            raise DifflabError(f"cannot change {', '.join(changed)} when resuming (only {', '.join(changeable)})")
        cfg = dataclasses.replace(saved, **{k: v for k, v in overrides.items() if k in changeable})
    else:
        base = dataclasses.asdict(config) if isinstance(config, ClassifierTrainConfig) else config
        cfg = make_config(base, config_class=ClassifierTrainConfig, **overrides)
    check_counts_and_seed(cfg, ("steps", "batch_size", "timesteps", "log_every", "checkpoint_every"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DifflabError("train-classifier runs in one process: start it without torchrun")
    if not 0.0 < cfg.holdout < 1.0:
        raise DifflabError(f"--holdout must lie in (0, 1), got {cfg.holdout}")
    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    torch.manual_seed(cfg.seed)

    # ---- data: labelled images, a seeded held-out split for the accuracy table
    data = load_dataset(cfg.dataset, image_size=cfg.image_size, channels=cfg.channels, data_dir=cfg.data_dir, progress=progress)
    if data.labels is None:
        raise DifflabError(f"'{cfg.dataset}' has no labels: a classifier needs a named dataset or a folder with one "
                           "subfolder per class")
    n_all, channels, height, width = data.images.shape
    order = torch.randperm(n_all, generator=torch.Generator().manual_seed(cfg.seed))
    n_held = max(1, int(round(cfg.holdout * n_all)))
    train_idx, held_idx = order[n_held:], order[:n_held]
    hflip = cfg.hflip if cfg.hflip is not None else default_hflip(data.name)
    cfg = dataclasses.replace(cfg, image_size=height, channels=channels, hflip=hflip)
    images, labels = data.images.to(device), data.labels.to(device)
    train_idx = train_idx.to(device)

    # ---- model and optimizer
    ecfg = unet_config(cfg.preset, image_size=height, in_channels=channels, **cfg.model)
    net = EncoderClassifier(ecfg, len(data.class_names)).to(device)
    schedule = make_schedule(cfg.schedule, cfg.timesteps)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=cuda or None)
    config_json = classifier_config(ecfg, class_names=data.class_names, schedule=cfg.schedule, timesteps=cfg.timesteps,
                                    data={"name": data.name, "channels": channels, "image_size": height})
    noise_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)

    start = 0
    if resume is not None:
        checkpoint = latest_valid_checkpoint(run_dir)
        if checkpoint is not None:
            load_state(net, load_weights(checkpoint, "model"), checkpoint)
            tensors, meta = load_training_state(checkpoint)
            optimizer_from_tensors(optimizer, tensors, meta["optimizer"])
            restore_noise_generator(noise_gen, tensors, meta, cfg.seed)
            start = meta["step"]
        if start >= cfg.steps:
            print(f"{run_dir} has already trained {start} steps (asked for {cfg.steps}); raise --steps to go on")
            return run_dir
    else:
        run_dir = prepare_run_dir(cfg, overwrite, suffix="-classifier")
    write_json(run_dir / "config.json", dataclasses.asdict(cfg))

    def checkpoint_now(step: int) -> Path:
        tensors, opt_meta = optimizer_to_tensors(optimizer)
        tensors["rng.noise"] = noise_gen.get_state()
        # the classifier keeps no EMA: its "ema" file holds the same weights, so every checkpoint has one layout
        try:
            return save_checkpoint(run_dir, step, model=net, ema=net, config=config_json, state_tensors=tensors,
                                   state_json={"optimizer": opt_meta, "noise_device": device.type}, keep=cfg.keep)
        except CheckpointWriteError as e:
            if step == cfg.steps:
                raise
            tqdm.write(f"warning: {e}; training continues")
            return None

    # ---- the loop: x_t ~ q(x_t | x_0) at t ~ U{0..T-1}, cross-entropy of p(y | x_t, t)
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda else nullcontext()
    log_path = run_dir / "log.jsonl"
    if resume is not None and log_path.is_file():
        truncate_log(log_path, start)
    log_file = open(log_path, "a")
    bar = tqdm(total=cfg.steps, initial=start, desc=f"training {run_dir.name}", unit="step", disable=not progress, dynamic_ncols=True)
    loss_sum, correct, seen, t_last = 0.0, 0, 0, time.perf_counter()
    net.train()
    stop = GracefulStop()
    try:
        for step in range(start, cfg.steps):
            if stop.requested:
                path = checkpoint_now(step)
                raise DifflabError(f"interrupted after step {step}; " + (
                    f"checkpoint saved in {path}. Continue with: difflab train-classifier --resume {run_dir}"
                    if path else "the checkpoint could not be written"))
            torch.manual_seed(step_seed(cfg.seed, step))  # dropout, if any: a pure function of the step
            idx = train_idx[batch_indices(step, cfg.batch_size, len(train_idx), cfg.seed).to(device)]
            x0, y = to_model_range(images[idx]), labels[idx]
            if hflip:
                x0 = random_hflip(x0, noise_gen)
            t = torch.randint(0, schedule.T, (x0.shape[0],), generator=noise_gen, device=device)
            noise = torch.randn(x0.shape, generator=noise_gen, device=device)
            with autocast:
                logits = net(q_sample(x0, t, noise, schedule), t.float())
            loss = nn.functional.cross_entropy(logits.float(), y)
            lr = learning_rate(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            done = step + 1
            if torch.isfinite(loss) and torch.isfinite(grad_norm):
                optimizer.step()
                loss_sum += loss.item() * len(y)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
            else:
                tqdm.write(f"warning: step {done}: non-finite loss or gradient, step skipped")
            bar.update(1)
            if done % cfg.log_every == 0 or done == cfg.steps:
                now = time.perf_counter()
                row = {"step": done, "loss": loss_sum / max(1, seen), "train_accuracy": correct / max(1, seen),
                       "lr": lr, "img_per_s": seen / (now - t_last)}
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()
                bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['train_accuracy']:.2f}")
                loss_sum, correct, seen, t_last = 0.0, 0, 0, now
            if done % cfg.checkpoint_every == 0 and done != cfg.steps:
                checkpoint_now(done)
    finally:
        stop.restore()
        bar.close()
        log_file.close()
    checkpoint_now(cfg.steps)

    # ---- how well it classifies at each noise level (held-out images)
    rows = accuracy_by_noise_level(net, schedule, images[held_idx.to(device)].cpu(), labels[held_idx.to(device)].cpu(), seed=cfg.seed)
    chance = float(torch.bincount(data.labels[held_idx]).max()) / len(held_idx)
    write_json(run_dir / "accuracy.json", {"held_out": len(held_idx), "chance": chance, "rows": rows})
    _plot_accuracy(rows, chance, run_dir / "accuracy.png")
    if progress:
        print(f"held-out accuracy of {run_dir.name} by noise level ({len(held_idx)} images):")
        print(format_accuracy_table(rows, chance))
    return run_dir


def _plot_accuracy(rows: list[dict], chance: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot([r["t"] for r in rows], [r["accuracy"] for r in rows], "o-", label="held-out accuracy")
    ax.axhline(chance, color="gray", ls="--", lw=1, label="chance")
    ax.set(xlabel="timestep t (noise grows to the right)", ylabel="accuracy", ylim=(0, 1.02),
           title="noise-aware classifier")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
