"""The captions of a text-to-image run (tutorial §6): where they come from, how each step draws them, and the
token vectors the U-Net's cross-attention reads.

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

from dataclasses import dataclass

import torch

from difflab.conditioning import text_cache
from difflab.data import ImageData
from difflab.data.captions import DEFAULT_TEMPLATES, caption_from_labels, caption_table, draw_captions, parse_templates
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


def grid_prompts(data: ImageData, texts: list[str]) -> list[str]:
    """The fixed prompts of the training sample grids: for shapes, seen and held-out combinations alike; for
    labelled data, the first template of each class (up to :data:`GRID_PROMPTS`); otherwise the first captions."""
    if data.name == "shapes":
        from difflab.data.shapes import prompts

        half = GRID_PROMPTS // 2
        return prompts("seen", GRID_PROMPTS - half, seed=0) + prompts("held_out", half, seed=0)
    seen, chosen = set(), []
    for text in texts:
        if text not in seen:
            seen.add(text)
            chosen.append(text)
    if data.captions is None and data.class_names is not None:  # templates: one prompt per class
        per_class = len(chosen) // len(data.class_names)
        chosen = chosen[::per_class] if per_class else chosen
    return chosen[:GRID_PROMPTS]


def build_captions(captions: list[list[str]], encoder, *, device: torch.device, progress: bool) -> Captions:
    """The caption table of a run; the distinct texts are encoded once by a frozen ``encoder``, or tokenized for a
    from-scratch one."""
    texts, offsets, flat = caption_table(captions)
    if encoder.trainable:
        tokens = encoder.tokenize(texts)
        table = {"ids": tokens["ids"].to(device), "mask": tokens["mask"].bool().to(device)}
    else:
        table = text_cache(encoder, texts, device=device, progress=progress)
    return Captions(texts, offsets.to(device), flat.to(device), table)
