"""The training loop (tutorial §4.1; DDPM Algorithm 1), one function that reads top to bottom:
data -> noise -> loss -> step -> EMA -> log -> sample grid -> checkpoint.

    import difflab
    run = difflab.train(dataset="digits", steps=3000)      # -> Path of the run folder
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from difflab import distributed
from difflab.checkpoint import (
    CheckpointWriteError,
    latest_valid_checkpoint,
    list_checkpoints,
    load_state,
    load_training_state,
    load_weights,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_checkpoint,
    write_json,
)
from difflab.config import TrainConfig, check_counts_and_seed, make_config
from difflab.data import load_dataset, to_model_range
from difflab.denoisers import Denoiser
from difflab.errors import DifflabError
from difflab.losses import denoising_loss
from difflab.nn import UNet, unet_config
from difflab.pipeline import model_config
from difflab.runs import (
    GracefulStop,
    batch_indices,
    default_hflip,
    learning_rate,
    random_hflip,
    prepare_run_dir,
    restore_noise_generator,
    step_seed,
    truncate_log,
)
from difflab.schedules import make_schedule
from difflab.viz import plot_loss, save_grid

# fields that shape the model or the data: a resumed run must keep them
FROZEN_ON_RESUME = ("dataset", "image_size", "channels", "preset", "model", "prediction", "schedule", "timesteps",
                    "batch_size", "seed", "weighting", "hflip", "conditional")


def train(config: TrainConfig | dict | None = None, *, resume: str | Path | None = None, overwrite: bool = False,
          progress: bool = True, **overrides) -> Path:
    """Train a diffusion model and return its run folder (config, log, loss.png, sample grids, checkpoints).

    ``config`` is a :class:`TrainConfig` or a dict of its fields; keyword overrides win. With ``resume``
    (a run folder) training continues from its newest checkpoint: weights, EMA, optimizer, step counter,
    data order and random states are restored, so the result is the same as an uninterrupted run."""
    if resume is not None:
        run_dir = Path(resume)
        saved = run_dir / "config.json"
        if not saved.is_file():
            raise DifflabError(f"cannot resume: '{run_dir}' is not a run folder (no config.json)")
        base = json.loads(saved.read_text())
        cfg, old = make_config(base, **overrides), make_config(base)
        changed = [k for k in FROZEN_ON_RESUME if k in overrides and getattr(cfg, k) != getattr(old, k)
                   and overrides[k] is not None]
        if changed:
            raise DifflabError(f"cannot change {', '.join(changed)} when resuming a run")
    else:
        base = dataclasses.asdict(config) if isinstance(config, TrainConfig) else config
        cfg = make_config(base, **overrides)
    check_counts_and_seed(cfg, ("steps", "batch_size", "timesteps", "log_every", "checkpoint_every", "num_samples",
                                "sample_steps"))
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise DifflabError(f"--ema-decay must lie in [0, 1), got {cfg.ema_decay}")
    if cfg.max_bad_steps < 0:
        raise DifflabError(f"--max-bad-steps must be 0 (never stop) or more, got {cfg.max_bad_steps}")
    if not (math.isfinite(cfg.guidance_scale) and cfg.guidance_scale >= 0):
        raise DifflabError(f"--guidance-scale must be a finite number >= 0, got {cfg.guidance_scale}")
    if cfg.eval_every and cfg.eval_samples < 2:
        raise DifflabError(f"--eval-samples must be at least 2 (thousands for a meaningful FID), got {cfg.eval_samples}")
    if not 0.0 <= cfg.label_dropout < 1.0:
        raise DifflabError(f"--label-dropout must lie in [0, 1), got {cfg.label_dropout}")
    if "num_classes" in cfg.model:
        raise DifflabError("set --conditional instead of model.num_classes: the number of classes comes from the dataset")

    if cfg.image_size is not None:  # refuse a size the U-Net cannot take before spending time on the data
        unet_config(cfg.preset, image_size=cfg.image_size, in_channels=cfg.channels or 1, **cfg.model)
    # one process, or one of several started by torchrun (DistributedDataParallel; see difflab.distributed)
    with distributed.session(cfg.device) as dist_info:
        return _train(cfg, dist_info, resume=run_dir if resume is not None else None, overwrite=overwrite,
                      progress=progress and dist_info.is_main)


def _train(cfg: TrainConfig, dist_info: distributed.DistInfo, *, resume: Path | None, overwrite: bool,
           progress: bool) -> Path:
    device, main, world = dist_info.device, dist_info.is_main, dist_info.world_size
    cuda = device.type == "cuda"
    if cfg.batch_size % world:
        raise DifflabError(f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the {world} "
                           "processes")
    shard = slice(*distributed.shard_range(cfg.batch_size, dist_info.rank, world))  # this process's part of a batch
    torch.manual_seed(cfg.seed)

    # ---- data: the whole dataset as uint8 on the device (all supported datasets fit). The main process
    # loads (and, if needed, downloads) first, so several processes never write the same cache file.
    def load():
        return load_dataset(cfg.dataset, image_size=cfg.image_size, channels=cfg.channels, data_dir=cfg.data_dir,
                            progress=progress)

    data = distributed.main_first(load)
    if data is None:  # the other processes, once the main one is done
        data = load()
    n, channels, height, width = data.images.shape
    if height != width:
        raise DifflabError(f"images must be square for the U-Net, got {height}x{width} (set --image-size)")
    hflip = cfg.hflip if cfg.hflip is not None else default_hflip(data.name)
    cfg = dataclasses.replace(cfg, image_size=height, channels=channels, hflip=hflip)  # saved resolved
    images = data.images.to(device)
    num_classes = None
    if cfg.conditional:
        if data.labels is None:
            raise DifflabError(f"--conditional needs labelled data: '{cfg.dataset}' has no labels (a folder needs one "
                               "subfolder per class)")
        num_classes = len(data.class_names)
        labels = data.labels.to(device)

    # ---- model: U-Net (+ class embedding with a null class) + preconditioning, an EMA copy, AdamW
    ucfg = unet_config(cfg.preset, image_size=height, in_channels=channels, **cfg.model, num_classes=num_classes)
    schedule = make_schedule(cfg.schedule, cfg.timesteps)
    net = UNet(ucfg).to(device)
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(net).requires_grad_(False)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=cuda or None)
    mconfig = model_config(ucfg, prediction=cfg.prediction, schedule=cfg.schedule, timesteps=cfg.timesteps,
                           data={"name": data.name, "channels": channels, "image_size": height,
                                 "class_names": data.class_names})
    if num_classes:
        mconfig["label_dropout"] = cfg.label_dropout  # 0: the null class never trained, guidance makes no sense
    sigmas = schedule.sigmas.to(device=device, dtype=torch.float32)
    # every process draws the noise of the whole global batch from the same stream and keeps its slice: without
    # dropout the run is the same whatever the number of processes, and one saved state resumes them all
    noise_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)

    # ---- run folder, or the state of the run being resumed
    start, skipped = 0, 0
    if resume is not None:
        run_dir = resume
        checkpoint = latest_valid_checkpoint(run_dir)
        if checkpoint is not None:
            load_state(net, load_weights(checkpoint, "model"), checkpoint)
            load_state(ema, load_weights(checkpoint, "ema"), checkpoint)
            tensors, meta = load_training_state(checkpoint)
            optimizer_from_tensors(optimizer, tensors, meta["optimizer"])
            restore_noise_generator(noise_gen, tensors, meta, cfg.seed)
            start, skipped = meta["step"], meta.get("skipped", 0)
        if main:
            truncate_log(run_dir / "log.jsonl", start)
        if start >= cfg.steps:
            if main:
                print(f"{run_dir} has already trained {start} steps (asked for {cfg.steps}); raise --steps to go on")
            return run_dir
    else:  # the main process picks (and numbers) the folder; the others learn its name, or its error
        run_dir = Path(distributed.broadcast_object(distributed.main_first(lambda: str(prepare_run_dir(cfg, overwrite)))))
    if main:
        write_json(run_dir / "config.json", dataclasses.asdict(cfg))

    # the network the optimizer trains: wrapped by DDP, which averages gradients over processes in backward()
    train_net = net
    if world > 1:
        train_net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if cuda else None)
    denoiser = Denoiser(torch.compile(train_net) if cfg.compile else train_net, schedule, cfg.prediction)
    sample_denoiser = Denoiser(ema, schedule, cfg.prediction).eval()
    weighting = cfg.weighting or cfg.prediction

    def on_main(what: str, fn) -> None:
        """Side effects of the main process only (log rows, grids, plots, metrics). They must never end a run
        (a full disk, a metric that cannot be computed from too few samples): warn and train on."""
        if main:
            try:
                fn()
            except Exception as e:  # no collective runs in here, so the other processes are not left waiting
                tqdm.write(f"warning: {what} failed: {type(e).__name__}: {e}; training continues")

    def log_row(row: dict) -> None:
        with open(run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    saved = {"step": start if resume is not None else None}

    def checkpoint_now(step: int, *, final: bool = False) -> Path | None:
        """Write a checkpoint (main process only). A failed write (disk full, ...) is reported and training
        goes on with the previous checkpoints intact; only the last one of a run must succeed, and then every
        process learns of the failure, so none waits for the others."""
        if world > 1:  # DDP keeps the copies identical; check it (a float64 checksum per process, max - min)
            with torch.no_grad():
                total = torch.stack([torch.cat([p.flatten() for p in group]).double().sum() for group in (params, ema_params)])
            spread = (distributed.all_reduce_(total.clone(), "max") - distributed.all_reduce_(total.clone(), "min")).abs()
            on_main("writing the log", lambda: log_row({"step": step, "rank_weight_spread": float(spread.max())}))
            if main and spread.max() > 0:
                tqdm.write(f"warning: the {world} processes hold different weights at step {step} "
                           f"(checksum spread {float(spread.max()):.3g}); this should not happen under DDP")

        def write() -> Path:
            tensors, opt_meta = optimizer_to_tensors(optimizer)
            tensors["rng.noise"] = noise_gen.get_state()
            return save_checkpoint(run_dir, step, model=net, ema=ema, config=mconfig, state_tensors=tensors,
                                   state_json={"optimizer": opt_meta, "skipped": skipped, "noise_device": device.type},
                                   keep=cfg.keep)

        saved["step"] = step  # on every rank (success or not), so all agree whether the step still needs one
        if final:
            return distributed.main_first(write, error_prefix="training finished but its final checkpoint failed: ")
        path = None
        if main:
            try:
                path = write()
            except CheckpointWriteError as e:
                tqdm.write(f"warning: {e}; training continues, the newest good checkpoint stays "
                           f"{(list_checkpoints(run_dir) or [Path('(none yet)')])[-1]}")
        return path

    # the main process scores; a bad extractor name or missing weights stop every process alike
    evaluator = distributed.main_first(lambda: make_evaluator(cfg, data, device, progress)) if cfg.eval_every else None
    # conditional models are evaluated and shown class by class, with classifier-free guidance
    # (a model trained without label dropout has an untrained null class: its grids are plain conditional)
    guidance = dict(guidance_scale=cfg.guidance_scale if cfg.label_dropout > 0 else 1.0) if num_classes else {}

    def evaluate_now(step: int) -> None:  # every process samples a share of the images; the main one scores them
        cond = torch.arange(cfg.eval_samples) % num_classes if num_classes else None
        with torch.autocast("cuda", torch.bfloat16) if cuda else nullcontext():
            fake = distributed.generate_sharded(sample_denoiser, (channels, height, width), cfg.eval_samples,
                                                sampler="ddim", steps=50, seed=10_000, cond=cond, **guidance)
        on_main("evaluation", lambda: log_row({"step": step, **{f"eval_{k}": v for k, v in evaluator(fake).items()}}))

    def sample_grid(step: int) -> None:
        per_row = max(1, cfg.num_samples // num_classes) if num_classes else None  # one row per class
        cond = torch.arange(num_classes).repeat_interleave(per_row) if num_classes else None
        with torch.autocast("cuda", torch.bfloat16) if cuda else nullcontext():
            grid = distributed.generate_sharded(sample_denoiser, (channels, height, width),
                                                len(cond) if num_classes else cfg.num_samples, sampler="ddim",
                                                steps=cfg.sample_steps, seed=0, cond=cond, **guidance)

        def draw() -> None:
            save_grid(grid, run_dir / "samples" / f"step_{step:07d}.png", nrow=per_row)
            save_grid(grid, run_dir / "samples.png", nrow=per_row)
            plot_loss(run_dir / "log.jsonl", run_dir / "loss.png")

        on_main("drawing the sample grid", draw)

    # ---- the loop
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda else nullcontext()
    params, ema_params = list(net.parameters()), list(ema.parameters())
    bar = tqdm(total=cfg.steps, initial=start, desc=f"training {run_dir.name}", unit="step", disable=not progress,
               dynamic_ncols=True)
    loss_sum, loss_count, since_log, bad_in_a_row, t_last = 0.0, 0, 0, 0, time.perf_counter()
    stop_agreed = False
    net.train()
    stop = GracefulStop(quiet=not main)
    try:
        for step in range(start, cfg.steps):
            if stop_agreed:  # Ctrl-C / SIGTERM came during the previous step, which finished: save and stop
                if saved["step"] != step:
                    checkpoint_now(step)
                newest = (list_checkpoints(run_dir) or [None])[-1]
                raise DifflabError(f"interrupted after step {step}; "
                                   + (f"newest checkpoint: {newest}. Continue with: difflab train --resume {run_dir}"
                                      if newest else "no checkpoint could be written"), all_ranks=True)
            # dropout draws from the global generator: seeded per step (and process), so resuming needs no
            # generator state and the processes of a DDP run drop different units
            torch.manual_seed(step_seed(cfg.seed, step, dist_info.rank))
            # data: the global batch in [-1, 1], optionally mirrored; then this process's slice of it
            idx = batch_indices(step, cfg.batch_size, n, cfg.seed).to(device)
            x0 = to_model_range(images[idx])
            if hflip:
                x0 = random_hflip(x0, noise_gen)
            # noise: t ~ U{1..T}, eps ~ N(0, I)   (DDPM Algorithm 1, lines 3-4)
            t = torch.randint(0, schedule.T, (x0.shape[0],), generator=noise_gen, device=device)
            noise = torch.randn(x0.shape, generator=noise_gen, device=device)
            # labels, a fraction dropped to the null class (Ho & Salimans 2022, Algorithm 1: p_uncond)
            cond = None
            if num_classes:
                cond = labels[idx]
                drop = torch.rand(cond.shape[0], generator=noise_gen, device=device) < cfg.label_dropout
                cond = torch.where(drop, num_classes, cond)[shard]
            x0, t, noise = x0[shard], t[shard], noise[shard]
            if cuda:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            # loss: ||eps - eps_theta(sqrt(abar) x0 + sqrt(1 - abar) eps, t)||^2 and its equivalents
            with autocast:
                loss = denoising_loss(denoiser, x0, sigmas[t], noise, weighting=weighting, cond=cond).mean()
            # step: the learning-rate schedule and the EMA count optimizer updates, not batches seen
            updates = step - skipped
            lr = learning_rate(updates, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # under DDP the gradients arrive averaged over all processes
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            # one small all-reduce per step: the mean loss, and whether any process was asked to stop
            shared = distributed.all_reduce_(torch.stack([loss.detach().float(), grad_norm.float(),
                                                          torch.tensor(float(stop.requested), device=device)]), "sum")
            mean_loss, grad_norm, stop_agreed = shared[0] / world, shared[1] / world, bool(shared[2] > 0)
            done = step + 1
            if torch.isfinite(mean_loss) and torch.isfinite(grad_norm):
                optimizer.step()
                # EMA of the weights, with a warm-up so short runs are not dominated by the initialisation
                decay = min(cfg.ema_decay, (1 + updates) / (10 + updates))
                with torch.no_grad():  # outside autograd, or every step would extend the graph
                    torch._foreach_lerp_(ema_params, params, 1 - decay)
                loss_sum += float(mean_loss)
                loss_count += 1
                bad_in_a_row = 0
            else:  # a non-finite step changes nothing: no update, no EMA, no schedule step; counted and logged
                skipped += 1
                bad_in_a_row += 1
                if main:
                    tqdm.write(f"warning: step {done}: non-finite loss or gradient, step skipped "
                               f"({bad_in_a_row} in a row, {skipped} in all)")
                if cfg.max_bad_steps and bad_in_a_row >= cfg.max_bad_steps:
                    path = checkpoint_now(done)
                    raise DifflabError(
                        f"{bad_in_a_row} non-finite steps in a row (up to step {done}): training diverged. The weights "
                        f"were not touched by those steps{f' and are saved in {path}' if path else ''}; resume with a "
                        f"lower --lr or --grad-clip: difflab train --resume {run_dir} --lr {cfg.lr / 10:g}", all_ranks=True)
            bar.update(1)
            since_log += 1
            # log (main process only)
            if main and (done % cfg.log_every == 0 or done == cfg.steps):
                now = time.perf_counter()
                row = {"step": done, "loss": loss_sum / loss_count if loss_count else None, "lr": lr,
                       "grad_norm": float(grad_norm), "img_per_s": since_log * cfg.batch_size / (now - t_last),
                       "skipped": skipped}
                on_main("writing the log", lambda: log_row(row))
                if loss_count:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.0f}")
                loss_sum, loss_count, since_log, t_last = 0.0, 0, 0, now
            if stop_agreed:  # a Ctrl-C during this step: straight to the checkpoint, no evaluation or grid first
                continue
            if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
                evaluate_now(done)
            if cfg.sample_every and done % cfg.sample_every == 0 and done != cfg.steps:
                sample_grid(done)
            if done % cfg.checkpoint_every == 0 and done != cfg.steps:
                checkpoint_now(done)
    finally:
        stop.restore()
        bar.close()
    checkpoint_now(cfg.steps, final=True)
    if cfg.eval_every:
        evaluate_now(cfg.steps)
    sample_grid(cfg.steps)
    return run_dir


def make_evaluator(cfg: TrainConfig, data, device: torch.device, progress: bool):
    """Features of (up to) eval_samples real images, computed once; returns fake images -> metrics dict."""
    from difflab.data import to_model_range
    from difflab.evaluation import default_features, parse_metrics
    from difflab.metrics import compute_features, evaluate_features, get_extractor

    metrics = parse_metrics(cfg.eval_metrics)
    extractor = get_extractor(cfg.eval_features or default_features(data.name), device=str(device))
    idx = torch.randperm(len(data.images), generator=torch.Generator().manual_seed(0))[: cfg.eval_samples]
    real_feats, _ = compute_features(extractor, to_model_range(data.images[idx]), progress=False)

    def evaluator(fake: torch.Tensor) -> dict:
        fake_feats, fake_probs = compute_features(extractor, fake, progress=False)
        result = evaluate_features(real_feats, fake_feats, fake_probs=fake_probs, metrics=metrics)
        return {k: v for k, v in result.items() if isinstance(v, float)}

    return evaluator
