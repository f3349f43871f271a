"""Prompt adherence for the "shapes" dataset, checked by rule (no learned model): does an image show the
colours, shapes, count and relative position its prompt asks for?

GenEval (Ghosh et al. 2023) scores text-to-image models by running an object detector on each image and
checking the prompt's objects, counts, colours and positions. On the shapes of :mod:`difflab.data.shapes`
-- solid, well-separated objects of six saturated colours on black -- plain image processing is detector
enough:

1. colour: a rendered pixel is a blend of one palette colour with the black background, t * colour.
   Each pixel takes the palette colour closest to it in direction (hue and saturation, whatever the
   brightness) and counts as that colour when it is within MAX_ANGLE of it and at least half as
   bright (t >= 0.5); anything else is background. Judging by direction keeps a slightly noisy
   antialiased cyan edge, (10, 150, 100), cyan, where the nearest colour by distance is green;
2. objects: the connected pixels of one colour (8-neighbours), holes filled, tiny specks dropped;
3. shape: a triangle (apex up) has most of its mass low down, so the skewness of its rows' mass is
   strongly negative; circle and square, symmetric, are told apart by the *fill ratio*
   area / (widest row x tallest column): 1 for a square, pi/4 = 0.785 for a circle. Both are measured on
   soft coverage (antialiased edges count by how much they are covered), so that a 5-pixel circle does
   not look square.

    check_image(image, "a red circle to the left of a blue square")
    # {'present': True, 'count': True, 'colour': True, 'attribution': True, 'position': True, 'overall': True}
    print(format_adherence_table(score(images, prompts)))
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from difflab.data import from_model_range
from difflab.data.shapes import COLOURS, PromptSpec, parse_prompt
from difflab.errors import DifflabError

__all__ = ["CATEGORIES", "Detection", "analyse", "detect", "check_image", "score", "format_adherence_table"]

CATEGORIES = ("present", "count", "colour", "attribution", "position", "overall")

# Thresholds (why these values):
MAX_ANGLE = 30.0  # degrees between a pixel and its palette colour. Palette colours are >= 45 degrees apart
#   (red and yellow), so their halfway lines sit at >= 22.5 degrees and 30 only lets in pixels that are
#   nearer one colour anyway. It accepts a drifted red like (190, 60, 60) (24 degrees) and rejects grey,
#   (128, 128, 128), which is >= 35 degrees from every colour.
MIN_COVERAGE = 0.5  # t = pixel . colour / |colour|^2: an object pixel is at least half its colour; this is
#   the usual 50% coverage cut, and keeps the background's noise (t ~ 0.1) out
MIN_AREA = 0.01  # fraction of the image: the smallest rendered object (a 5.5 px triangle at 16 px) covers 6%.
#   Specks of a noisy sample are smaller.
MAX_SPECKLE = 0.1  # fraction of the image in coloured specks (components under MIN_AREA): above this the image is
#   noise, not a scene, and fails every category -- otherwise a field of random colours "contains" every colour and,
#   somewhere, every shape. Renders have none (clean or with noise of sigma 20: < 1%).
# Objects never touch the image border (the generator keeps a black margin): a coloured region that does is a
#   tinted background, not an object, and is not detected (a full-frame tint would otherwise be a perfect "square").
TRIANGLE_SKEW = -0.2  # row-mass skewness <= this: a triangle, apex up (ideal -0.566, the skewness of a
#   density growing linearly from apex to base). Measured on renders at 16..64 px: triangles -0.83..-0.36
#   (-0.27 with noise of sigma 30 or a blur of 0.8 px at 32 px), circles and squares, symmetric top to
#   bottom, within +-0.15. The fill ratio alone cannot do it at 16 px: a 5.5 px triangle's widest row and
#   tallest column are averaged over a pixel, which lifts its fill to 0.79, into the circles' range.
SQUARE_FILL = 0.88  # fill >= this: square (ideal 1.0; renders measure 1.00..1.03, with noise or blur
#   0.87..1.03)
CIRCLE_FILL = 0.68  # fill in [this, SQUARE_FILL) and no skew: circle (ideal 0.785; a small disc's widest row
#   is a bit narrower than its diameter: renders measure 0.78..0.83, with noise or blur 0.73..0.90).
#   Lower and symmetric (a diamond, a cross): "other"
MIN_FILL = 0.35  # below this the blob is a line or an arc, not one of the shapes: "other"
MAX_ASPECT = 1.6  # widest row / tallest column (or the inverse) beyond this: "other" (all shapes have 1)
DEAD_ZONE = 0.1  # fraction of the side: a relation holds when the centroids are further apart than this
#   along its axis. Rendered relation scenes put them >= 0.3 apart (object sizes plus a gap).

_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _NAMES], np.float32)  # (colours, 3)
_EIGHT = np.ones((3, 3), bool)  # 8-connectivity: an antialiased diagonal edge stays one object


@dataclass(frozen=True)
class Detection:
    """One object found in an image."""

    colour: str  # a key of shapes.COLOURS
    shape: str  # one of shapes.SHAPES, or "other" when the geometry fits none
    cx: float  # centroid, fraction of the width (0 = left)
    cy: float  # centroid, fraction of the height (0 = top)
    area: float  # fraction of the image
    fill: float  # area / (widest row x tallest column): square 1, circle 0.785, triangle 0.5
    skew: float  # skewness of the rows' mass: about -0.57 for a triangle (apex up), 0 for the others


def _as_hwc(image) -> np.ndarray:
    """An (H, W, 3) uint8 image (numpy or torch; (3, H, W) is accepted too) as float32 (H, W, 3)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
        image = image.transpose(1, 2, 0)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise DifflabError(f"the adherence checker takes one uint8 RGB image (H, W, 3); got {image.dtype} "
                           f"{tuple(image.shape)}")
    return image.astype(np.float32)


def _shape_of(fill: float, aspect: float, skew: float) -> str:
    if not 1 / MAX_ASPECT <= aspect <= MAX_ASPECT or fill < MIN_FILL:
        return "other"
    if skew <= TRIANGLE_SKEW:
        return "triangle" if fill < SQUARE_FILL else "other"
    return "square" if fill >= SQUARE_FILL else "circle" if fill >= CIRCLE_FILL else "other"


def detect(image, *, min_area: float = MIN_AREA) -> list[Detection]:
    """The objects of one (H, W, 3) uint8 image: colour, shape, centroid and area of each, largest first."""
    return analyse(image, min_area=min_area)[0]


def analyse(image, *, min_area: float = MIN_AREA) -> tuple[list[Detection], float]:
    """:func:`detect`'s objects, and the fraction of the image covered by coloured specks too small to be one."""
    img = _as_hwc(image)  # (H, W, 3)
    h, w, _ = img.shape
    dot = img @ _PALETTE.T  # (H, W, colours)
    coverage = np.clip(dot / (_PALETTE**2).sum(1), 0, 1)  # t: the pixel as a multiple of each colour
    cosine = dot / (np.linalg.norm(img, axis=-1, keepdims=True) * np.linalg.norm(_PALETTE, axis=1) + 1e-6)
    best = cosine.argmax(-1)[..., None]  # (H, W, 1): the colour of the nearest direction
    ok = ((np.take_along_axis(cosine, best, -1) >= np.cos(np.radians(MAX_ANGLE)))
          & (np.take_along_axis(coverage, best, -1) >= MIN_COVERAGE))[..., 0]
    nearest = np.where(ok, best[..., 0] + 1, 0)  # (H, W): 0 background, k palette colour k - 1
    any_object = nearest > 0
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5  # pixel centres
    found, speckle = [], 0.0
    for k, name in enumerate(_NAMES, start=1):
        mask = ndimage.binary_fill_holes(nearest == k)  # a noisy pixel inside an object is still the object
        labels, n = ndimage.label(mask, structure=_EIGHT)
        if n == 0:
            continue
        # Soft coverage: 1 inside a rendered object, the antialiased fraction on its edge. Edge pixels
        # under half-coverage were classed as background, so each object takes back the background
        # pixels next to it (they hold the rest of its edge).
        alpha = coverage[..., k - 1]  # (H, W)
        for j in range(1, n + 1):
            core = labels == j
            ring = ndimage.binary_dilation(core, _EIGHT) & ~any_object
            # Normalise by the object's own inside level, so that a dimmer red (200, 0, 0) is as full a
            # shape as (255, 0, 0): the fill ratio is about geometry, not brightness.
            level = max(float(np.median(alpha[core])), MIN_COVERAGE)
            a = np.where(core | ring, np.clip(alpha / level, 0, 1), 0)  # (H, W)
            area = float(a.sum())
            if area < min_area * h * w:
                speckle += float(core.sum())
                continue
            if core[0].any() or core[-1].any() or core[:, 0].any() or core[:, -1].any():
                continue  # touches the border: background, not an object (see the thresholds)
            widest, tallest = float(a.sum(1).max()), float(a.sum(0).max())
            fill, aspect = area / (widest * tallest), widest / tallest
            cx, cy = float((a * xs).sum() / area), float((a * ys).sum() / area)
            var = float((a * (ys - cy) ** 2).sum() / area)
            skew = float((a * (ys - cy) ** 3).sum() / area / var ** 1.5) if var > 0 else 0.0
            found.append(Detection(name, _shape_of(fill, aspect, skew), cx / w, cy / h, area / (h * w), fill, skew))
    return sorted(found, key=lambda d: -d.area), speckle / (h * w)


def _position(found: list[Detection], relation) -> bool:
    """Does the subject's centroid lie on the named side of the reference's, beyond the dead zone?"""
    subject, name, reference = relation
    pick = [next((d for d in found if (d.colour, d.shape) == pair), None) for pair in (subject, reference)]
    if None in pick:
        return False  # an object that is not there is nowhere
    s, r = pick  # the largest of each, as `found` is sorted by area
    offset = {"left": r.cx - s.cx, "right": s.cx - r.cx, "above": r.cy - s.cy, "below": s.cy - r.cy}[name]
    return offset > DEAD_ZONE


def check_image(image, prompt: str | PromptSpec, *, detections: list[Detection] | None = None
                ) -> dict[str, bool | None]:
    """Which parts of ``prompt`` the (H, W, 3) uint8 ``image`` gets right; None where a part does not apply.

    present      every named shape is there, in any colour
    count        each named shape is there exactly as often as the prompt says, and nothing else is
    colour       each named colour is on some object
    attribution  each named (colour, shape) is one object, as often as named (a red circle, not a red
                 square next to a blue circle)
    position     relation prompts: the subject lies on the named side of the reference (else None)
    overall      every part that applies is right

    An image that is mostly coloured specks (more than ``MAX_SPECKLE`` of it: noise, not a scene) fails every part.
    """
    spec = prompt if isinstance(prompt, PromptSpec) else parse_prompt(prompt)
    speckle = 0.0
    if detections is None:
        detections, speckle = analyse(image)
    found = detections
    shapes = Counter(d.shape for d in found)
    pairs = Counter((d.colour, d.shape) for d in found)
    wanted_shapes = Counter(s for _, s in spec.objects)
    result: dict[str, bool | None] = {
        "present": all(shapes[s] > 0 for s in wanted_shapes),
        "count": len(found) == spec.count and all(shapes[s] == k for s, k in wanted_shapes.items()),
        "colour": all(any(d.colour == c for d in found) for c, _ in spec.objects),
        "attribution": all(pairs[p] >= k for p, k in Counter(spec.objects).items()),
        "position": None if spec.relation is None else _position(found, spec.relation),
    }
    if speckle > MAX_SPECKLE:  # unreadable: noise
        result = {k: None if v is None else False for k, v in result.items()}
    result["overall"] = all(v for v in result.values() if v is not None)
    return result


def score(images: torch.Tensor, prompts: Sequence[str]) -> dict:
    """Check a batch of images against their prompts.

    Args:
        images: (N, 3, H, W), uint8 pixels or floats in [-1, 1] (what the samplers return).
        prompts: N prompts of the shapes grammar, one per image.

    Returns ``{"accuracy": {category: fraction or None}, "n": {category: prompts it applies to},
    "per_image": [check_image result, ...]}``; position applies to relation prompts only.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise DifflabError(f"score takes an (N, 3, H, W) image tensor, got {shape}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise DifflabError(f"score takes uint8 pixels or floats in [-1, 1], got {images.dtype}")
    if isinstance(prompts, str) or len(prompts) != len(images):
        raise DifflabError(f"score needs one prompt per image: {len(images)} images, "
                           f"{1 if isinstance(prompts, str) else len(prompts)} prompts")
    specs = [parse_prompt(p) for p in prompts]  # fail on a bad prompt before any work
    pixels = images if images.dtype == torch.uint8 else from_model_range(images)
    pixels = pixels.detach().cpu().permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    per_image = [check_image(img, spec) for img, spec in zip(pixels, specs)]
    accuracy, n = {}, {}
    for cat in CATEGORIES:
        values = [r[cat] for r in per_image if r[cat] is not None]
        n[cat] = len(values)
        accuracy[cat] = sum(values) / len(values) if values else None
    return {"accuracy": accuracy, "n": n, "per_image": per_image}


def format_adherence_table(result: dict) -> str:
    """``score``'s result as a plain text table: category, accuracy in %, number of prompts it applies to."""
    lines = [f"{'category':<12} {'accuracy':>9} {'n':>6}"]
    for cat in CATEGORIES:
        acc = result["accuracy"][cat]
        lines.append(f"{cat:<12} {'-' if acc is None else f'{100 * acc:.1f}%':>9} {result['n'][cat]:>6}")
    return "\n".join(lines)

