"""The text side of a text-to-image run (tutorial §6): where the captions come from, the text encoder, how each step
draws captions, and the token vectors the U-Net's cross-attention reads.

- Captions: a captioned folder (``metadata.jsonl`` or ``.txt`` beside each image), the procedural ``shapes`` dataset,
  or any labelled dataset through caption templates ("a photo of a {class}"). An image may have several captions;
  each step draws one of them per image (:func:`difflab.data.captions.draw_captions`).
- A frozen encoder (the default, the pretrained all-MiniLM-L6-v2) encodes every distinct caption once before
  training (:func:`difflab.conditioning.text_cache`, cached on disk); a step only indexes that table. A from-scratch
  encoder learns with the U-Net, so a step hands it token ids instead and the U-Net encodes them.
- Caption dropout replaces a fraction of the drawn captions by the empty prompt, so one network learns both
  D(x, sigma, prompt) and D(x, sigma, "") for classifier-free guidance.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from difflab import distributed
from difflab.conditioning import TextConditioner, read_prompts, text_cache
from difflab.data import ImageData
from difflab.data.captions import (
    DEFAULT_TEMPLATES,
    caption_from_labels,
    caption_table,
    draw_captions,
    fill_template,
    parse_templates,
)
from difflab.errors import DifflabError

GRID_PROMPTS = 8  # prompts (rows) of a training-time sample grid


@dataclass
class Captions:
    """Every training image's captions (a CSR table into ``texts``) and the conds of the distinct texts."""

    texts: list[str]                 # the distinct captions
    offsets: torch.Tensor            # (N + 1,) image i's captions are flat[offsets[i]:offsets[i + 1]]
    flat: torch.Tensor               # (M,) indices into texts
    table: dict[str, torch.Tensor]   # per text: {"tokens", "mask"} (frozen encoder) or {"ids", "mask"} (from scratch)

    def draw(self, idx: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The cond of one randomly chosen caption of each image in ``idx``."""
        chosen = draw_captions(self.offsets, self.flat, idx, generator)  # (n,) indices into texts
        return {k: v[chosen] for k, v in self.table.items()}


def image_captions(data: ImageData, templates: str | None) -> list[list[str]]:
    """The captions of each image: the dataset's own, or its class names put into caption templates."""
    if data.captions is not None:
        if templates is not None:
            raise DifflabError(f"'{data.name}' has its own captions; --caption-templates applies to labelled datasets")
        return data.captions
    if data.labels is None:
        raise DifflabError(f"--text-encoder needs captions: '{data.name}' has none (give a folder with metadata.jsonl "
                           "or a .txt beside each image, a labelled dataset, or --dataset shapes)")
    return caption_from_labels(data.labels, data.class_names,
                               parse_templates(templates) if templates is not None else DEFAULT_TEMPLATES)


def grid_prompts(data: ImageData, texts: list[str], templates: str | None) -> list[str]:
    """The fixed prompts of the training sample grids: for shapes, seen and held-out combinations alike; for
    labelled data, the first template of each class (up to :data:`GRID_PROMPTS`); otherwise the first captions."""
    if data.name == "shapes":
        from difflab.data.shapes import prompts

        half = GRID_PROMPTS // 2
        return prompts("seen", GRID_PROMPTS - half, seed=0) + prompts("held_out", half, seed=0)
    if data.captions is None and data.class_names is not None:  # templates: one prompt per class
        first = parse_templates(templates)[0] if templates is not None else DEFAULT_TEMPLATES[0]
        return [fill_template(first, name) for name in data.class_names[:GRID_PROMPTS]]
    return texts[:GRID_PROMPTS]


@dataclass
class TextSetup:
    """What a text run knows before its U-Net exists: the captions, and either the frozen encoder (loaded) or the
    config of a from-scratch one (built by the U-Net)."""

    captions: list[list[str]]
    frozen: object | None            # a frozen difflab.nn.text encoder, or None for a from-scratch one
    unet: dict                       # U-Net settings: context_dim [, text_encoder]


def prepare_text(cfg, data: ImageData, ctx) -> TextSetup:
    """The captions of ``data`` and the encoder of ``cfg.text_encoder`` (the main process first: it may download)."""
    from difflab.nn.text import ScratchTextEncoder, load_text_encoder  # transformers only for text runs

    captions = image_captions(data, cfg.caption_templates)
    if cfg.text_encoder == "scratch":
        texts = sorted({t for per_image in captions for t in per_image})
        config = ScratchTextEncoder.config_for(texts, max_length=cfg.text_max_length)
        return TextSetup(captions, None, {"context_dim": config["width"], "text_encoder": config})

    def load():
        return load_text_encoder(cfg.text_encoder, max_length=cfg.text_max_length).to(ctx.device)

    encoder = distributed.main_then_others(load)
    return TextSetup(captions, encoder, {"context_dim": encoder.width})


def text_conditioning(cfg, data: ImageData, text: TextSetup, encoder, ctx) -> tuple[Captions, TextConditioner]:
    """The caption table (distinct texts encoded once by a frozen encoder -- the main process writes the cache --
    or tokenized for a from-scratch one) and the run's conditioner."""
    def build():
        return build_captions(text.captions, encoder, device=ctx.device, progress=ctx.progress)

    captions = distributed.main_then_others(build)
    prompts = read_prompts(cfg.sample_prompts) if cfg.sample_prompts else grid_prompts(data, captions.texts,
                                                                                     cfg.caption_templates)
    return captions, TextConditioner(encoder, cfg.caption_dropout, prompts)


def build_captions(captions: list[list[str]], encoder, *, device: torch.device, progress: bool) -> Captions:
    """The caption table of a run; the distinct texts are encoded once by a frozen ``encoder``, or tokenized for a
    from-scratch one."""
    texts, offsets, flat = caption_table(captions)
    if encoder.trainable:
        tokens = encoder.tokenize(texts)
        if encoder.last_truncated:
            warnings.warn(f"{encoder.last_truncated} of {len(texts)} captions are longer than --text-max-length "
                          f"{encoder.max_length} tokens and were cut", stacklevel=2)
        table = {"ids": tokens["ids"].to(device), "mask": tokens["mask"].bool().to(device)}
    else:
        table = text_cache(encoder, texts, device=device, progress=progress)
    return Captions(texts, offsets.to(device), flat.to(device), table)
