"""Evaluation glue (tutorial §7): where real and generated images come from, and one call that turns them
into metrics. The metrics themselves (FID, KID, IS, precision/recall) live in :mod:`difflab.metrics`.

    real:  a dataset name, an image folder, or a saved reference (.safetensors from --save-reference)
    fake:  a run / checkpoint folder (sampled on the fly), an image folder, or a dataset (real vs real)
    A dataset may name its split: "fashion-mnist:test".
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from difflab import distributed
from difflab.data import load_dataset, to_model_range
from difflab.devices import autocast, resolve_device
from difflab.errors import DifflabError
from difflab.generate import default_guidance_scale, generate_sharded
from difflab.metrics import compute_features, evaluate_features, get_extractor, load_reference
from difflab.metrics import save_reference as save_reference_file
from difflab.metrics.domain import DOMAIN_EXTRACTORS
from difflab.model_file import is_model_file, model_file_config
from difflab.models import is_foreign_model, load_model, upgrade_config
from difflab.training.checkpoint import REQUIRED_FILES, list_checkpoints, read_config, resolve_checkpoint

DEFAULT_METRICS = ("fid", "kid", "pr")


def default_features(dataset_name: str | None) -> str:
    """The shipped domain classifier for datasets that have one (offline), else the Inception network."""
    return dataset_name if dataset_name in DOMAIN_EXTRACTORS else "inception"


def parse_metrics(text: str | None) -> tuple[str, ...]:
    if not text:
        return DEFAULT_METRICS
    names = tuple(m.strip().lower() for m in text.split(",") if m.strip())
    known = ("fid", "kid", "is", "pr")
    wrong = [m for m in names if m not in known]
    if wrong:
        raise DifflabError(f"unknown metric(s) {', '.join(wrong)} (choose from {', '.join(known)})")
    return names


def is_reference(path: str) -> bool:
    return str(path).endswith(".safetensors") and Path(path).is_file() and not is_model_file(path)


def is_run(path: str) -> bool:
    """A model to sample: a run folder with a checkpoint, a checkpoint folder, a single-file model, or a diffusers
    pipeline folder or hub id."""
    p = Path(path)
    return bool(list_checkpoints(p)) or all((p / f).is_file() for f in REQUIRED_FILES) or is_foreign_model(path)


def dataset_split(source: str, split: str) -> tuple[str, str]:
    """("fashion-mnist", "test") from "fashion-mnist:test"; a source without a split keeps ``split``."""
    if ":" in source and not Path(source).exists():
        source, split = source.rsplit(":", 1)
    return source, split


def load_real_images(source: str, *, n: int | None, image_size: int | None, channels: int | None,
                     data_dir: str | None = None, split: str = "train", progress: bool = True) -> tuple[torch.Tensor, str]:
    """Real images in [-1, 1] from a dataset name or folder (the first ``n`` of a seeded shuffle)."""
    source, split = dataset_split(source, split)
    data = load_dataset(source, image_size=image_size, channels=channels, data_dir=data_dir, split=split, progress=progress)
    images = data.images
    if n is not None and n < len(images):
        images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:n]]
    return to_model_range(images), data.name


def load_fake_images(source: str, *, n: int, progress: bool = True, device: str = "auto", **sample_options) -> tuple[torch.Tensor, dict]:
    """Generated images in [-1, 1]: sampled from a run/checkpoint (with the sampler options), or read from
    a folder. Returns the images and a dict describing where they came from."""
    if is_run(source):
        model = load_model(source, device=device)
        stats: dict = {}
        with autocast(model.device):  # under torchrun every process samples a share
            images = generate_sharded(model, n, progress=progress and distributed.is_main(), stats=stats,
                                      **sample_options)
        return images.cpu(), {"run": str(source), "dataset": model.config["data"]["name"], "nfe": stats["nfe"],
                              **{k: v for k, v in sample_options.items() if v is not None}}
    images, name = load_real_images(source, n=n, image_size=None, channels=None, progress=progress)
    return images, {"images": str(source), "dataset": name}


def _dataset_of(model: str) -> str | None:
    """The dataset a model was trained on, read from its config without loading it (None: not recorded, as in a
    diffusers folder from elsewhere or a Hub id, which is not downloaded for this)."""
    from difflab.diffusers_io import DIFFLAB_FILE, is_pipeline_folder

    if is_model_file(model):
        config = model_file_config(model)
    elif is_pipeline_folder(model):
        recorded = Path(model) / DIFFLAB_FILE  # what difflab export writes beside the diffusers files
        try:
            config = json.loads(recorded.read_text()) if recorded.is_file() else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
    elif is_foreign_model(model):
        return None
    else:
        config = upgrade_config(read_config(resolve_checkpoint(model)))
    data = config.get("data") if isinstance(config, dict) else None
    return data.get("name") if isinstance(data, dict) else None


def evaluate(real: str, fake: str, *, metrics: tuple[str, ...] = DEFAULT_METRICS, features: str | None = None,
             n: int = 10_000, inception_weights: str | None = None, device: str = "auto", data_dir: str | None = None,
             split: str = "train", save_reference: str | None = None, progress: bool = True,
             **sample_options) -> dict:
    """Metrics of ``fake`` against ``real`` on the features of one extractor; returns a JSON-able dict."""
    device = resolve_device(device)
    # choose (and load) the feature extractor first: a bad name should fail before minutes of sampling
    ref = load_reference(real) if is_reference(real) else None
    if ref is not None and save_reference:
        raise DifflabError("--save-reference needs a dataset or folder as --real, not a saved reference")
    if is_run(fake):
        dataset = _dataset_of(fake) or (ref.info.get("dataset") if ref is not None else real.split(":")[0])
    else:
        dataset = ref.info.get("dataset") if ref is not None else real.split(":")[0]
    if ref is not None:
        features = features or ref.info.get("features")
    features = features or default_features(dataset)
    extractor = get_extractor(features, device=str(device), inception_weights=inception_weights)
    fake_images, fake_info = load_fake_images(fake, n=n, progress=progress, device=str(device), **sample_options)
    if not distributed.is_main():  # under torchrun the processes shared the sampling; rank 0 measures
        return {}
    if ref is not None:
        if ref.extractor_name != extractor.name:
            raise DifflabError(f"reference {real} was computed with '{ref.extractor_name}', not '{extractor.name}'")
        real_feats, real_stats = ref.features, (ref.mu, ref.sigma)
    else:
        real_stats = None
        _, channels, h, _ = fake_images.shape
        real_images, real_name = load_real_images(real, n=n, image_size=h, channels=channels,
                                                  data_dir=data_dir, split=split, progress=progress)
        real_feats, _ = compute_features(extractor, real_images, progress=progress)
        if save_reference:
            save_reference_file(save_reference, real_feats, extractor_name=extractor.name,
                     info={"dataset": real_name, "split": split, "n": len(real_feats), "features": features})
    fake_feats, fake_probs = compute_features(extractor, fake_images, progress=progress)
    result = evaluate_features(real_feats, fake_feats, fake_probs=fake_probs, metrics=metrics, real_stats=real_stats)
    result.update(real=str(real), fake=fake_info, features=extractor.name,
                  comparable_to_papers=bool(getattr(extractor, "comparable_to_papers", False)))
    return result


def evaluate_prompts(fake: str, prompts: list[str], *, per_prompt: int = 4, seed: int = 0, device: str = "auto",
                     progress: bool = True, guidance_scale: float | None = None, **sample_options) -> dict:
    """Prompt adherence of a text-to-image model on the shapes dataset's prompts: ``per_prompt`` images of each
    prompt, each checked by the rule-based checker (:mod:`difflab.metrics.adherence`) for the objects, count,
    colours, colour attribution and position the prompt asks for. Returns per-category accuracies (JSON-able)."""
    from difflab.data.shapes import parse_prompt
    from difflab.metrics.adherence import score

    if per_prompt < 1:
        raise DifflabError(f"--per-prompt must be at least 1, got {per_prompt}")
    for prompt in prompts:  # one line for a prompt the checker cannot read, before any sampling
        parse_prompt(prompt)
    model = load_model(fake, device=device)
    if not model.takes_prompts:
        raise DifflabError(f"'{fake}' is not a text-to-image model (train one with difflab train --text-encoder)")
    if guidance_scale is None:
        guidance_scale = default_guidance_scale(model)
    expanded = [p for p in prompts for _ in range(per_prompt)]
    stats: dict = {}
    with autocast(model.device):  # under torchrun every process samples a share
        images = generate_sharded(model, len(expanded), prompts=expanded, seed=seed, guidance_scale=guidance_scale,
                                  progress=progress and distributed.is_main(), stats=stats, **sample_options)
    if not distributed.is_main():
        return {}
    result = score(images.cpu(), expanded)
    result.update(fake=str(fake), prompts=len(prompts), per_prompt=per_prompt, guidance_scale=guidance_scale,
                  nfe=stats["nfe"], **{k: v for k, v in sample_options.items() if v is not None})
    return result


def format_table(result: dict) -> str:
    """A small human-readable table of a result dict."""
    rows = []
    if "fid" in result:
        rows.append(("FID", f"{result['fid']:.4f}"))
    if "kid_mean" in result:
        rows.append(("KID", f"{result['kid_mean']:.5f} ± {result['kid_std']:.5f}"))
    if "is_mean" in result:
        rows.append(("Inception Score", f"{result['is_mean']:.3f} ± {result['is_std']:.3f}"))
    if "precision" in result:
        rows.append(("precision / recall", f"{result['precision']:.3f} / {result['recall']:.3f}"))
    note = "" if result.get("comparable_to_papers") else "  (domain features: compare only within this project)"
    lines = [f"features: {result['features']}{note}", f"real: {result['real']}  fake: {result['fake']}"]
    lines += [f"  {name:<20} {value}" for name, value in rows]
    return "\n".join(lines)


def make_evaluator(images: torch.Tensor, dataset_name: str, *, n: int, metrics: str, features: str | None,
                   device: torch.device):
    """For evaluation during training: the features of (up to) ``n`` real uint8 ``images``, computed once;
    returns a function of generated images in [-1, 1] -> dict of metrics (the floats of :func:`evaluate_features`)."""
    metrics = parse_metrics(metrics)
    extractor = get_extractor(features or default_features(dataset_name), device=str(device))
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:n]
    real_feats, _ = compute_features(extractor, to_model_range(images[idx.to(images.device)]), progress=False)

    def evaluator(fake: torch.Tensor) -> dict:
        fake_feats, fake_probs = compute_features(extractor, fake, progress=False)
        result = evaluate_features(real_feats, fake_feats, fake_probs=fake_probs, metrics=metrics)
        return {k: v for k, v in result.items() if isinstance(v, float)}

    return evaluator


@torch.no_grad()
def evaluate_autoencoder(vae: str, real: str, *, n: int = 10_000, split: str = "test", features: str | None = None,
                         fid: bool = True, batch_size: int = 256, image_size: int | None = None,
                         data_dir: str | None = None, inception_weights: str | None = None, device: str = "auto",
                         progress: bool = True) -> dict:
    """How well an autoencoder (a train-vae run or a diffusers AutoencoderKL folder) reconstructs ``n`` real
    images: PSNR and SSIM (per image, averaged), rFID (FID between reconstructions and originals, on the features of
    one extractor), the latent shape and the compression ratio. Reconstructions decode the posterior mean."""
    from difflab.metrics.reconstruction import psnr, ssim
    from difflab.models import load_autoencoder

    device = resolve_device(device)
    trained = load_autoencoder(vae, device=device)
    real, split = dataset_split(real, split)
    size = image_size or trained.image_size
    images, real_name = load_real_images(real, n=n, image_size=size, channels=trained.autoencoder.config.in_channels,
                                         data_dir=data_dir, split=split, progress=progress)
    _, channels, h, w = images.shape
    latent = trained.autoencoder.config.latent_shape(h)
    recon, scores = [], {"psnr": [], "ssim": []}
    with torch.autocast(device.type, enabled=False):  # reconstruction quality in float32
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device)
            r = trained.autoencoder.decode(trained.autoencoder.encode(x).mean).clamp(-1, 1)
            scores["psnr"].append(psnr(r, x).cpu())
            scores["ssim"].append(ssim(r, x).cpu())
            recon.append(r.cpu())
    psnrs = torch.cat(scores["psnr"])
    result = {"autoencoder": str(vae), "real": f"{real_name}:{split}", "n": len(images),
              "image_shape": [channels, h, w], "latent_shape": list(latent),
              "compression": channels * h * w / (latent[0] * latent[1] * latent[2]),
              "psnr": float(psnrs[torch.isfinite(psnrs)].mean()) if torch.isfinite(psnrs).any() else float("inf"),
              "ssim": float(torch.cat(scores["ssim"]).mean())}
    if fid:
        features = features or default_features(real_name)
        extractor = get_extractor(features, device=str(device), inception_weights=inception_weights)
        real_feats, _ = compute_features(extractor, images, progress=progress)
        fake_feats, _ = compute_features(extractor, torch.cat(recon), progress=progress)
        result.update(rfid=evaluate_features(real_feats, fake_feats, metrics=("fid",))["fid"], features=extractor.name)
    return result


def format_autoencoder_table(result: dict) -> str:
    c, h, w = result["image_shape"]
    lc, lh, lw = result["latent_shape"]
    rows = [("images", f"{result['n']} of {result['real']}, {c}x{h}x{w}"),
            ("latent", f"{lc}x{lh}x{lw} (f = {h // lh}; {result['compression']:.1f}x fewer numbers)"),
            ("PSNR", f"{result['psnr']:.2f} dB"), ("SSIM", f"{result['ssim']:.4f}")]
    if "rfid" in result:
        rows.append(("rFID", f"{result['rfid']:.4f}  ({result['features']} features)"))
    return "\n".join([f"autoencoder: {result['autoencoder']}"] + [f"  {k:<8} {v}" for k, v in rows])
