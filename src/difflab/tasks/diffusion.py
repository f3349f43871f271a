"""Diffusion training (tutorial §4.1; DDPM Algorithm 1; EDM §5 and Table 1), the task behind ``difflab train``.

Each step draws clean images x0 (optionally mirrored), noise levels sigma from the parameterization's training
distribution (DDPM: t ~ U{1..T}; EDM: ln sigma ~ N(P_mean, P_std^2)), noise n ~ N(0, I) and -- for a
conditional model -- conditions with a fraction dropped to the null condition; the loss is the one denoising loss
lambda(sigma) ||D(x0 + sigma n, sigma, cond) - x0||^2 (:mod:`difflab.losses`).

    import difflab
    run = difflab.train(dataset="digits", steps=3000)                         # DDPM, eps-prediction
    run = difflab.train(parameterization="edm", name="digits-edm")            # EDM (Karras et al. 2022)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from difflab import distributed
from difflab.conditioning import ClassConditioner, Cond, TextConditioner, cond_index, cond_len, read_prompts
from difflab.denoisers import PARAMETERIZATIONS, Denoiser, EDMParameterization, Parameterization, VPParameterization
from difflab.devices import autocast, to_device
from difflab.encoders import LatentEncoder, PixelEncoder, latent_cache, moments_statistics
from difflab.errors import DifflabError
from difflab.evaluation import make_evaluator
from difflab.generate import generate_sharded
from difflab.losses import denoising_loss
from difflab.models import Model, TrainedAutoencoder, load_autoencoder, load_model, model_config
from difflab.nn import UNet, unet_config
from difflab.schedules import make_schedule
from difflab.tasks.images import load_training_images
from difflab.tasks.text import prepare_text, text_conditioning
from difflab.training import loop
from difflab.training.checkpoint import latest_valid_checkpoint
from difflab.training.config import setting
from difflab.training.runs import batch_indices, random_hflip
from difflab.training.task import Task
from difflab.viz import save_grid

VP_DEFAULTS = {"prediction": "eps", "weighting": None, "schedule": "linear", "timesteps": 1000}


@dataclass
class DiffusionConfig:
    """The settings of diffusion training besides the shared ones (:class:`difflab.training.config.RunConfig`)."""

    # the network
    preset: str = setting("tiny", "U-Net size preset: tiny, small, ddpm-cifar10", frozen=True)
    model: dict = setting(dict, "U-Net config overrides, e.g. {base_channels: 48} (config file only)", frozen=True)
    # the parameterization
    parameterization: str = setting("vp", "vp (DDPM: discrete timesteps, an eps, x0 or v target) or edm (Karras et "
                                          "al. 2022: continuous sigma, sigma_data preconditioning)", frozen=True,
                                     metavar="KIND")
    prediction: str = setting("eps", "vp: what the network predicts: eps (the tutorial's noise), x0 or v", frozen=True)
    weighting: str | None = setting(None, "vp: loss weighting: eps, x0 or v (default: the same as --prediction, i.e. "
                                          "plain MSE on the output)", frozen=True)
    schedule: str = setting("linear", "vp: noise schedule: linear, cosine, quadratic, sigmoid", frozen=True)
    timesteps: int = setting(1000, "vp: number of diffusion steps T", frozen=True)
    sigma_data: float | None = setting(None, "edm: standard deviation of the data (default: measured on the "
                                             "training images)", frozen=True, metavar="SIGMA")
    # latent diffusion (tutorial §5.3)
    vae: str | None = setting(None, "train in the latent space of this autoencoder: a difflab train-vae run or "
                                    "checkpoint, or a diffusers AutoencoderKL folder (Stable Diffusion's VAE) or hub "
                                    "id; the dataset is encoded once into a cached set of latents", frozen=True,
                              metavar="RUN_OR_FOLDER")
    # conditioning
    conditional: bool = setting(False, "class-conditional: the U-Net also sees the dataset's labels (needs labelled "
                                       "data: a named dataset or a folder with one subfolder per class)", frozen=True)
    label_dropout: float = setting(0.1, "conditional: fraction of labels replaced by the learned null class, so one "
                                        "model is conditional and unconditional (needed for classifier-free guidance)")
    guidance_scale: float = setting(3.0, "conditional: classifier-free guidance scale of the sample grids "
                                         "(0 = unconditional, 1 = conditional, >1 = stronger)")
    # text-to-image (tutorial §6)
    text_encoder: str | None = setting(None, "text-to-image: condition on the captions through this text encoder: "
                                             "minilm (the pretrained all-MiniLM-L6-v2, offline), a Hugging Face folder "
                                             "or hub id (BERT, CLIP text, T5), or scratch (a small transformer trained "
                                             "with the U-Net)", frozen=True, metavar="NAME_OR_PATH")
    text_max_length: int | None = setting(None, "text: tokens per prompt, longer ones are cut (default: 32; scratch: the "
                                                "longest caption)",
                                          frozen=True, metavar="L")
    caption_dropout: float = setting(0.1, "text: fraction of captions replaced by the empty prompt, so the model is "
                                          "also unconditional (needed for guidance)")
    caption_templates: str | None = setting(None, "text, labelled datasets: captions from the class names, templates "
                                                  "separated by | (default: 'a photo of a {class}|a {class}|...')",
                                            frozen=True, metavar="TEMPLATES")
    sample_prompts: str | None = setting(None, "text: a file with the sample grids' prompts, one per line (default: 8 "
                                               "from the data; shapes: 4 seen and 4 held-out combinations)",
                                         metavar="FILE")
    # pictures and evaluation during training
    num_samples: int = setting(64, "images in each sample grid")
    sample_steps: int | None = setting(None, "sampler steps for the sample grids (default: the model's: DDIM 50 "
                                             "for vp, Heun 18 for edm)")
    eval_samples: int = setting(1000, "generated images per evaluation (the model's default sampler, EMA weights)")
    eval_metrics: str = setting("fid", "metrics to log during training, comma-separated: fid, kid, is, pr")
    eval_features: str | None = setting(None, "feature extractor for evaluation (default: the shipped classifier for "
                                              "digits and fashion-mnist, else inception)")


class DiffusionBatch(NamedTuple):
    x0: torch.Tensor        # clean images in the model's space (n, C, H, W)
    sigma: torch.Tensor     # noise levels (n,)
    noise: torch.Tensor     # n ~ N(0, I), like x0
    cond: Cond              # conditions (a fraction dropped to the null condition), or None


class DiffusionTask(Task):
    """Train a denoiser (U-Net + parameterization) on a dataset; the sample grid is its progress picture."""

    name, noun, command = "diffusion", "diffusion", "difflab train"
    config_class = DiffusionConfig
    summary = "train a diffusion model"
    description = ("Train a diffusion model (tutorial §4.1; DDPM or EDM) and write samples, a loss plot and "
                   "checkpoints to a run folder.")
    examples = """examples:
  difflab train                                  # tiny U-Net on the bundled 8x8 digits (CPU, a few minutes)
  difflab train --parameterization edm           # EDM (Karras et al. 2022): sampled with Heun, 18 steps
  difflab train --dataset fashion-mnist --preset small --steps 20000 --batch-size 128
  difflab train --dataset ./my_photos --image-size 64 --preset small
  difflab train --config run.yaml --lr 1e-4      # flags override the file
  difflab train --resume runs/digits --steps 10000
  difflab train --conditional                    # class-conditional (label dropout 0.1): one row per class in samples.png
  difflab train --dataset shapes --text-encoder minilm   # text-to-image on 32x32 shapes with the pretrained MiniLM
  difflab train --dataset ./captioned --text-encoder scratch --image-size 64   # metadata.jsonl or .txt captions
  torchrun --nproc_per_node 4 -m difflab train --dataset cifar10 --preset ddpm-cifar10   # 4 GPUs, global batch split

every run folder holds config.json, log.jsonl, loss.png, samples.png (+ samples/step_*.png) and
checkpoints/step_*/ (safetensors weights + EMA + JSON config + optimizer state). The first Ctrl-C saves a
checkpoint and stops; a NaN step is skipped; --max-bad-steps of them in a row stop the run with a checkpoint."""
    report = "samples: {run}/samples.png, loss plot: {run}/loss.png\nsample more with: difflab sample {run_arg}"

    @classmethod
    def check(cls, run, cfg: DiffusionConfig) -> None:
        for name in ("timesteps", "num_samples"):
            if getattr(cfg, name) < 1:
                raise DifflabError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
        if cfg.sample_steps is not None and cfg.sample_steps < 1:
            raise DifflabError(f"--sample-steps must be at least 1, got {cfg.sample_steps}")
        if not (math.isfinite(cfg.guidance_scale) and cfg.guidance_scale >= 0):
            raise DifflabError(f"--guidance-scale must be a finite number >= 0, got {cfg.guidance_scale}")
        if run.eval_every and cfg.eval_samples < 2:
            raise DifflabError(f"--eval-samples must be at least 2 (thousands for a meaningful FID), got {cfg.eval_samples}")
        ClassConditioner(["any"], cfg.label_dropout)  # checks the dropout rate
        if cfg.text_encoder is not None:
            if cfg.conditional:
                raise DifflabError("use either --conditional (class labels) or --text-encoder (captions), not both")
            if not 0.0 <= cfg.caption_dropout < 1.0:
                raise DifflabError(f"--caption-dropout must lie in [0, 1), got {cfg.caption_dropout}")
            if cfg.text_max_length is not None and not 2 <= cfg.text_max_length <= 512:
                raise DifflabError(f"--text-max-length must lie in [2, 512] (a start token and a word), got "
                                   f"{cfg.text_max_length}")
            if run.hflip and str(run.dataset).lower() == "shapes":
                raise DifflabError("--hflip would mirror the shapes but not their captions ('left of' <-> 'right of')")
            if cfg.sample_prompts is not None:
                read_prompts(cfg.sample_prompts)  # one line for a missing or empty file, before the data loads
        elif any(v is not None for v in (cfg.text_max_length, cfg.caption_templates, cfg.sample_prompts)):
            raise DifflabError("--text-max-length, --caption-templates and --sample-prompts apply with --text-encoder")
        if any(k in cfg.model for k in ("context_dim", "text_encoder")):
            raise DifflabError("set --text-encoder instead of model.context_dim: the width comes from the encoder")
        if "num_classes" in cfg.model:
            raise DifflabError("set --conditional instead of model.num_classes: the number of classes comes from the "
                               "dataset")
        if cfg.parameterization not in PARAMETERIZATIONS:
            raise DifflabError(f"--parameterization must be one of {', '.join(PARAMETERIZATIONS)}, got "
                               f"'{cfg.parameterization}'")
        if cfg.parameterization == "edm":
            vp_only = [k for k, v in VP_DEFAULTS.items() if getattr(cfg, k) != v]
            if vp_only:
                raise DifflabError(f"--{', --'.join(vp_only)} appl{'ies' if len(vp_only) == 1 else 'y'} to "
                                   "--parameterization vp only (EDM fixes its own preconditioning and weighting)")
            if cfg.sigma_data is not None:
                EDMParameterization(cfg.sigma_data)  # checks it
        elif cfg.sigma_data is not None:
            raise DifflabError("--sigma-data applies to --parameterization edm only")
        make_schedule(cfg.schedule, cfg.timesteps)  # a bad schedule name fails here, before the data loads
        if run.image_size is not None and cfg.vae is None:  # refuse a size the U-Net cannot take, before the data
            unet_config(cfg.preset, image_size=run.image_size, in_channels=run.channels or 1, **cfg.model)

    def setup(self) -> torch.nn.Module:
        cfg, ctx = self.config, self.ctx
        if cfg.text_encoder is not None and self.run.hflip is None:  # a mirror swaps "left of" and "right of"
            self.run = dataclasses.replace(self.run, hflip=False)
        data, self.run = load_training_images(self.run, ctx, captions=cfg.text_encoder is not None)
        self.data_name, self.image_shape = data.name, tuple(data.images.shape[1:])
        self.images = data.images.to(ctx.device)  # all supported datasets fit; uint8 until a batch is drawn
        self.encoder, self.latents = PixelEncoder(), None
        if cfg.vae is not None:
            self.encoder, self.latents = self._latent_setup(data)
        self.conditioner, self.labels, self.captions, text = None, None, None, None
        if cfg.text_encoder is not None:  # the captions, and a frozen encoder or a from-scratch one's config
            text = prepare_text(cfg, data, ctx)
        if cfg.conditional:
            if data.labels is None:
                raise DifflabError(f"--conditional needs labelled data: '{self.run.dataset}' has no labels (a folder "
                                   "needs one subfolder per class)")
            self.conditioner = ClassConditioner(data.class_names, cfg.label_dropout)
            self.labels = data.labels.to(ctx.device)
        if cfg.parameterization == "edm" and cfg.sigma_data is None:
            std = data_std(self.images, self.encoder) if self.latents is None else self.latent_sigma_data
            self.config = cfg = dataclasses.replace(cfg, sigma_data=round(std, 6))
        self.parameterization = make_parameterization(cfg)
        channels, size = self.encoder.model_shape(self.image_shape)[:2]
        num_classes = self.conditioner.num_classes if isinstance(self.conditioner, ClassConditioner) else None
        self.unet = unet_config(cfg.preset, image_size=size, in_channels=channels, **cfg.model,
                                **(text.unet if text else {}), num_classes=num_classes)
        net = UNet(self.unet).to(ctx.device)
        if text is not None:  # a from-scratch encoder is the one the U-Net owns and trains
            self.captions, self.conditioner = text_conditioning(cfg, data, text, text.frozen or net.text_encoder, ctx)
        self._model = None
        # the main process scores; a bad extractor name or missing weights stop every process alike. Built after
        # the U-Net: a feature network's initialisation must not move the random stream the U-Net starts from.
        self.evaluator = distributed.main_first(lambda: make_evaluator(
            data.images, data.name, n=cfg.eval_samples, metrics=cfg.eval_metrics, features=cfg.eval_features,
            device=ctx.device)) if self.run.eval_every else None
        self.shard = ctx.shard(self.run.batch_size)
        return net

    def _latent_setup(self, data) -> tuple[LatentEncoder, tuple[torch.Tensor, torch.Tensor]]:
        """The autoencoder of ``--vae`` and the posterior (mean, std) of every training image, from the latent
        cache (encoded once; mirrored copies follow the originals when flips apply)."""
        cfg, ctx, run = self.config, self.ctx, self.run
        trained = self._resumed_autoencoder() or load_autoencoder(cfg.vae, device=ctx.device)
        size = self.image_shape[1]
        if trained.image_size is not None and trained.image_size != size:
            raise DifflabError(f"the autoencoder {cfg.vae} was trained on {trained.image_size}x{trained.image_size} "
                               f"images, the data is {size}x{size} (set --image-size {trained.image_size})")
        probe = LatentEncoder.raw(trained.autoencoder, trained.source)
        probe.model_shape(self.image_shape)  # one line for a channel count or size the autoencoder cannot take

        def cache():
            return latent_cache(probe, data.images, data_name=data.name, hflip=run.hflip, device=ctx.device,
                                progress=ctx.progress)

        moments = distributed.main_then_others(cache)  # the main process writes the cache, the others read it
        if trained.mean is None:
            mean, std = moments_statistics(moments[0][: len(data.images)], moments[1][: len(data.images)])
            if ctx.main:
                print(f"the autoencoder {cfg.vae} records no latent statistics (only a run's final checkpoint does): "
                      "measured them on this dataset")
        else:
            mean, std = trained.mean, trained.std
        encoder = trained.encoder(mean, std)
        self.latent_sigma_data = whitened_std(encoder, moments[0], moments[1])  # on the CPU, before the move
        home = ctx.device  # the cache lives on the GPU when it fits in half of its free memory, else in host memory
        if ctx.device.type == "cuda" and 2 * moments[0].nbytes > 0.5 * torch.cuda.mem_get_info(ctx.device)[0]:
            home = torch.device("cpu")
            if ctx.main:
                print(f"the latent cache ({2 * moments[0].nbytes / 2**30:.1f} GiB) stays in host memory")
        return encoder.to(ctx.device), (moments[0].to(home), moments[1].to(home))

    def _resumed_autoencoder(self) -> TrainedAutoencoder | None:
        """On resume, the autoencoder (and statistics) the run trained with, from its newest checkpoint -- not
        whatever ``--vae`` holds now (a run folder that trained on, a folder that moved)."""
        if self.ctx.run_dir is None:
            return None
        checkpoint = latest_valid_checkpoint(self.ctx.run_dir, report=lambda checkpoint, problem: None)
        if checkpoint is None:
            return None
        model = load_model(checkpoint, device=self.ctx.device)
        encoder = model.encoder
        return TrainedAutoencoder(encoder.autoencoder, encoder.mean.flatten().tolist(), encoder.std.flatten().tolist(),
                                  encoder.source, self.image_shape[1])

    def checkpoint_modules(self) -> dict[str, torch.nn.Module]:
        """A latent model's checkpoints carry its autoencoder, so each one samples on its own."""
        return {LatentEncoder.weights_name: self.encoder.autoencoder} if self.latents is not None else {}

    def batch(self, step: int, generator: torch.Generator) -> DiffusionBatch:
        run, device = self.run, self.ctx.device
        idx = batch_indices(step, run.batch_size, len(self.images), run.seed, device)
        if self.latents is not None:  # latent diffusion: a fresh posterior draw z ~ q(z | x) of each cached image
            # the mirrored copy of image i is row N + i of the cache
            flip = torch.rand(len(idx), generator=generator, device=device) < 0.5 if run.hflip else None
            if self.latents[0].device == device:
                rows = idx if flip is None else idx + len(self.images) * flip
                mean, std = self.latents[0][rows], self.latents[1][rows]
            else:  # a cache in host memory: both candidate rows go over in one pinned copy, the flip picks there
                host = batch_indices(step, run.batch_size, len(self.images), run.seed)
                rows = host if flip is None else torch.cat([host, host + len(self.images)])
                mean, std = (to_device(t[rows], device) for t in self.latents)
                if flip is not None:
                    pick = flip.view(-1, *[1] * (mean.ndim - 1))
                    mean, std = (torch.where(pick, t[len(host):], t[: len(host)]) for t in (mean, std))
            x0 = self.encoder.whiten(mean + std * torch.randn(mean.shape, generator=generator, device=device))
        else:
            x0 = self.encoder.encode(self.images[idx])  # the global batch, in [-1, 1] for pixel models
            if run.hflip:
                x0 = random_hflip(x0, generator)
        sigma = self.parameterization.sample_sigma(x0.shape[0], generator, device)  # DDPM Alg. 1, line 3
        noise = torch.randn(x0.shape, generator=generator, device=device)  # line 4
        cond = None
        if self.captions is not None:  # a random caption of each image, a fraction dropped to the empty prompt
            cond = cond_index(self.conditioner.drop(self.captions.draw(idx, generator), generator), self.shard)
        elif self.conditioner is not None:  # Ho & Salimans 2022, Algorithm 1: drop with probability p_uncond
            cond = cond_index(self.conditioner.drop(self.labels[idx], generator), self.shard)
        x0 = x0[self.shard]  # this process's slice of the global batch
        x0 = x0.contiguous(memory_format=self.ctx.memory_format)  # the network's (devices.memory_format)
        return DiffusionBatch(x0, sigma[self.shard], noise[self.shard], cond)

    def loss(self, net, b: DiffusionBatch):
        # lambda(sigma) ||D(x0 + sigma n, sigma) - x0||^2: for eps-prediction ||eps - eps_theta(x_t, t)||^2 (line 5)
        denoiser = Denoiser(net, self.parameterization)
        weight = self.parameterization.loss_weight(b.sigma)
        return denoising_loss(denoiser, b.x0, b.sigma, b.noise, weight=weight, cond=b.cond), {}

    def model_config(self) -> dict:
        return model_config(self.unet, parameterization=self.parameterization, encoder=self.encoder,
                            conditioner=self.conditioner,
                            data={"name": self.data_name, "channels": self.image_shape[0],
                                  "image_size": self.image_shape[1]})

    def model(self, ema: torch.nn.Module) -> Model:
        """The EMA network as a :class:`Model`, for sampling."""
        if self._model is None or self._model.denoiser.net is not ema:
            conditioner = self.conditioner
            if isinstance(conditioner, TextConditioner) and conditioner.in_unet:  # prompts through the EMA's encoder
                conditioner = TextConditioner(ema.text_encoder, conditioner.dropout, conditioner.prompts)
            self._model = Model(Denoiser(ema, self.parameterization), self.encoder, conditioner, self.model_config())
        return self._model

    def _guidance(self) -> dict:
        """Conditional models are shown and evaluated with classifier-free guidance (one trained without label
        dropout has an untrained null class: plain conditional sampling)."""
        if self.conditioner is None:
            return {}
        return {"guidance_scale": self.config.guidance_scale if self.conditioner.trained_null else 1.0}

    def show(self, step: int, ema) -> None:
        """A grid from a fixed seed (one row per class for a conditional model): samples/step_N.png, samples.png."""
        run_dir = self.ctx.run_dir
        sample_grid(self.ctx, self.model(ema), self.conditioner, self.config.num_samples,
                    [run_dir / "samples" / f"step_{step:07d}.png", run_dir / "samples.png"],
                    steps=self.config.sample_steps, precision=self.run.precision, **self._guidance())

    def evaluate(self, step: int, ema) -> dict[str, float]:
        """Metrics of eval_samples generated images (the model's default sampler; every class equally often)
        against the real ones."""
        n, given = self.config.eval_samples, {}
        if isinstance(self.conditioner, TextConditioner):  # the training captions, cycled
            given = {"prompts": [self.captions.texts[i % len(self.captions.texts)] for i in range(n)]}
        elif self.conditioner is not None:
            given = {"cond": self.conditioner.balanced(n)}
        # every process samples a share of the images; the main one scores them
        with autocast(self.ctx.device, self.run.precision):
            fake = generate_sharded(self.model(ema), n, seed=10_000, **given, **self._guidance())
        result: dict[str, float] = {}
        self.ctx.on_main("evaluation", lambda: result.update(self.evaluator(fake)))
        return result


def sample_grid(ctx, model: Model, conditioner, num_samples: int, paths: list[Path], precision: str = "auto",
                **options) -> None:
    """The progress picture of a generative task: about ``num_samples`` images from seed 0 (one row per class or
    prompt when ``conditioner`` has them, the prompt written under each cell), sampled by every process and drawn
    by the main one into each of ``paths``. ``options`` go to :func:`difflab.generate.generate`."""
    cond, nrow = conditioner.grid(num_samples) if conditioner else (None, None)
    prompts = cond if isinstance(conditioner, TextConditioner) else None
    n = len(prompts) if prompts else cond_len(cond) or num_samples
    with autocast(ctx.device, precision):
        grid = generate_sharded(model, n, seed=0, **options, **({"prompts": prompts} if prompts else {"cond": cond}))

    def draw() -> None:
        for path in paths:
            save_grid(grid, path, nrow=nrow, captions=prompts)

    ctx.on_main("drawing the sample grid", draw)


def make_parameterization(cfg: DiffusionConfig) -> Parameterization:
    if cfg.parameterization == "edm":
        return EDMParameterization(cfg.sigma_data)
    return VPParameterization(make_schedule(cfg.schedule, cfg.timesteps), cfg.prediction, cfg.weighting)


@torch.no_grad()
def data_std(images: torch.Tensor, encoder: PixelEncoder, chunk: int = 4096) -> float:
    """The standard deviation of the training data in the model's space, over all examples and pixels: EDM's
    sigma_data (Karras et al. 2022, Appendix B.6 sets c_in, c_skip and c_out from it)."""
    total, total_sq, count = 0.0, 0.0, 0
    for start in range(0, len(images), chunk):
        x = encoder.encode(images[start:start + chunk]).double()
        total, total_sq, count = total + float(x.sum()), total_sq + float(x.square().sum()), count + x.numel()
    mean = total / count
    return math.sqrt(max(total_sq / count - mean**2, 0.0))


def whitened_std(encoder: LatentEncoder, mean: torch.Tensor, std: torch.Tensor) -> float:
    """EDM's sigma_data of whitened latents, in closed form from the cached posteriors: per channel c the model
    sees x = (z - m_c) / s_c with E[x] = (mu_c - m_c) / s_c and Var[x] = var_c / s_c^2 (law of total variance)."""
    mu, sd = (torch.tensor(v, dtype=torch.float64) for v in moments_statistics(mean, std))
    m, s = encoder.mean.flatten().double().cpu(), encoder.std.flatten().double().cpu()
    ex, varx = (mu - m) / s, (sd / s).square()
    return math.sqrt(max(float((varx + ex.square()).mean() - ex.mean().square()), 0.0))


def train(config: dict | None = None, *, resume: str | Path | None = None, overwrite: bool = False,
          progress: bool = True, **overrides) -> Path:
    """Train a diffusion model and return its run folder (config, log, loss.png, sample grids, checkpoints).

    ``config`` is a dict of settings (:class:`~difflab.training.config.RunConfig` and :class:`DiffusionConfig`
    fields); keyword overrides win. With ``resume`` (a run folder) training continues from its newest checkpoint:
    weights, EMA, optimizer, step counter, data order and random states are restored, so the result is the same
    as an uninterrupted run."""
    return loop.train(DiffusionTask, config, resume=resume, overwrite=overwrite, progress=progress, **overrides)
