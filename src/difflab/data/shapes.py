"""The built-in captioned dataset "shapes": one or two solid shapes on black, with a caption that names
their colour, shape, count and relative position -- small enough to train a text-to-image model on a
CPU, and regular enough that :mod:`difflab.metrics.adherence` can check by rule whether an image
follows its prompt (GenEval, Ghosh et al. 2023, does the same with an object detector).

    data = load_shapes("train", image_size=32)          # ImageData: uint8 (N, 3, H, W) + captions
    data.captions[0]                    # ['a magenta circle to the left of a red circle']
    load_shapes("test")                                 # only scenes with a held-out (colour, shape) pair
    parse_prompt("a red circle to the left of a blue square").relation
    # (('red', 'circle'), 'left', ('blue', 'square'))

The caption grammar (``parse_prompt`` accepts it, and a little more)::

    single    a <colour> <shape>                           "a red circle"
    count     two <colour> <shape>s                        "two green triangles"
    relation  a <colour> <shape> <relation> a <colour> <shape>
              relation: to the left of | to the right of | above | below

Compositional generalisation: the (colour, shape) pairs of ``held_out`` never appear in the "train"
split, and every "test" scene contains at least one of them; each held-out colour and shape is still
seen in training, only not together.

Every scene is drawn from its own random generator, seeded by ``(seed, split, index)``, so image ``i``
is the same whatever ``n`` is (prefix-stable), and train and test never share a stream.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from difflab.data import ImageData
from difflab.errors import DifflabError

# The corners of the RGB cube (black, the background, excluded): any two differ by 255 in at least one
# channel, so they stay apart under blur, noise and the colour drift of a half-trained model.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
# Told apart by geometry (adherence.py): a triangle's mass sits low; a square fills its extent, a circle pi/4.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
KINDS: tuple[str, ...] = ("single", "count", "relation")
# Relation name -> caption phrase; "left": the subject (first object) is left of the reference.
RELATIONS: dict[str, str] = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
DEFAULT_HELD_OUT: tuple[tuple[str, str], ...] = (("red", "triangle"), ("blue", "circle"), ("green", "square"))
MIN_SIZE, MAX_SIZE = 16, 64  # image sides the layout rules below are made (and tested) for
STREAMS = {"train": 0, "test": 1, "seen": 2, "held_out": 3}  # second seed word: splits never share scenes

# Layout, as fractions of the image side (pixel floors keep 16 px scenes readable by the checker):
SINGLE_SIZE = (0.30, 0.42)  # bounding-box side of a lone object
PAIR_SIZE = (0.22, 0.30)  # bounding-box side of each object of a pair
MIN_PIXELS = 5.5  # smallest object side in pixels: below ~5 px a circle rasterises to a square
BORDER = (0.04, 1.0)  # space between an object and the image edge: (fraction, at least px)
GAP = (0.06, 2.0)  # empty space between the boxes of two objects: (fraction, at least px)
CROSS_AXIS = 0.5  # relation scenes: |offset across the axis| <= this x the offset along it


@dataclass(frozen=True)
class Obj:
    """One solid shape. Positions and size are fractions of the image side, so a scene renders at any size."""

    colour: str  # a key of COLOURS
    shape: str  # one of SHAPES
    cx: float  # centre of the bounding box, 0 = left edge, 1 = right edge
    cy: float  # centre of the bounding box, 0 = top edge, 1 = bottom edge
    size: float  # side of the (square) bounding box: circle diameter, square side, triangle base and height


@dataclass(frozen=True)
class Scene:
    """What one image shows. For relation scenes ``objects[0]`` is the subject and ``objects[1]`` the reference."""

    objects: tuple[Obj, ...]
    relation: str | None  # a key of RELATIONS, or None
    kind: str  # one of KINDS
    caption: str


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for, in the terms the adherence checker tests."""

    objects: tuple[tuple[str, str], ...]  # every expected (colour, shape); "two red circles" lists it twice
    count: int  # how many objects the prompt asks for in all (1 or 2)
    relation: tuple[tuple[str, str], str, tuple[str, str]] | None  # (subject, key of RELATIONS, reference)
    kind: str  # one of KINDS
    text: str  # the prompt in the canonical caption wording


# ---------------------------------------------------------------------------------------------------
# Captions and their grammar


def caption(objects: Sequence[tuple[str, str]], relation: str | None = None) -> str:
    """The caption of one (colour, shape), of two equal ones (a count) or of two with a relation."""
    (c0, s0) = objects[0]
    if len(objects) == 1:
        return f"a {c0} {s0}"
    if relation is None:
        assert objects[0] == objects[1], "two different objects need a relation"
        return f"two {c0} {s0}s"
    (c1, s1) = objects[1]
    return f"a {c0} {s0} {RELATIONS[relation]} a {c1} {s1}"


_SINGULAR = ("a", "an", "one")
_RELATION_WORDS = {  # accepted phrasings -> relation name
    ("to", "the", "left", "of"): "left", ("on", "the", "left", "of"): "left", ("left", "of"): "left",
    ("to", "the", "right", "of"): "right", ("on", "the", "right", "of"): "right", ("right", "of"): "right",
    ("above",): "above", ("below",): "below",
}


def _grammar() -> str:
    return (f"prompts read '[a|an|one] <colour> <shape>', 'two <colour> <shape>s' or '<object> <relation> <object>' "
            f"with colours {', '.join(COLOURS)}; shapes {', '.join(SHAPES)}; relations "
            f"{', '.join(RELATIONS.values())}")


def _parse_object(words: list[str], i: int, text: str) -> tuple[int, tuple[str, str], int]:
    """Read ``[determiner] colour shape`` from ``words[i:]``: (count, (colour, shape), next index)."""
    count = None
    if i < len(words) and words[i] in _SINGULAR:
        count, i = 1, i + 1
    elif i < len(words) and words[i] == "two":
        count, i = 2, i + 1
    if i + 2 > len(words):
        raise DifflabError(f"cannot parse prompt {text!r}: it ends before '<colour> <shape>'; {_grammar()}")
    colour, noun = words[i], words[i + 1]
    if colour not in COLOURS:
        raise DifflabError(f"cannot parse prompt {text!r}: {colour!r} is not a colour; {_grammar()}")
    plural = {s + "s": s for s in SHAPES}
    if noun in SHAPES:
        shape, is_plural = noun, False
    elif noun in plural:
        shape, is_plural = plural[noun], True
    else:
        raise DifflabError(f"cannot parse prompt {text!r}: {noun!r} is not a shape; {_grammar()}")
    if is_plural != (count == 2):  # "two red circle", "red circles": the count is unclear, say so
        raise DifflabError(f"cannot parse prompt {text!r}: use 'two <colour> <shape>s' for two objects and "
                           f"'a <colour> <shape>' for one; {_grammar()}")
    return count or 1, (colour, shape), i + 2


def parse_prompt(text: str) -> PromptSpec:
    """Read a prompt of the caption grammar (see the module docstring) into a :class:`PromptSpec`.

    Case, punctuation and extra spaces do not matter; "an" and "one" work like "a", and "left of" /
    "on the left of" like "to the left of". Anything else raises a one-line :class:`DifflabError`."""
    if not isinstance(text, str):
        raise DifflabError(f"a prompt must be a string, got {type(text).__name__}")
    words = re.findall(r"[a-z]+", text.lower())
    if not words:
        raise DifflabError(f"cannot parse the empty prompt {text!r}; {_grammar()}")
    count, first, i = _parse_object(words, 0, text)
    if i == len(words):
        return PromptSpec((first,) * count, count, None, "count" if count == 2 else "single", caption([first] * count))
    phrase = next((p for p in _RELATION_WORDS if tuple(words[i:i + len(p)]) == p), None)
    if phrase is None:
        raise DifflabError(f"cannot parse prompt {text!r}: expected a relation after '{' '.join(words[:i])}'; "
                           f"{_grammar()}")
    relation, i = _RELATION_WORDS[phrase], i + len(phrase)
    count2, second, j = _parse_object(words, i, text)
    if j != len(words):
        raise DifflabError(f"cannot parse prompt {text!r}: unexpected words after the second object; {_grammar()}")
    if count != 1 or count2 != 1:
        raise DifflabError(f"cannot parse prompt {text!r}: a relation links one object to one object; {_grammar()}")
    if first == second:
        raise DifflabError(f"cannot parse prompt {text!r}: the two objects of a relation must differ in colour "
                           f"or shape")
    return PromptSpec((first, second), 2, (first, relation, second), "relation", caption([first, second], relation))


# ---------------------------------------------------------------------------------------------------
# Scenes


def _check_size(image_size) -> int:
    if (isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral)
            or not MIN_SIZE <= image_size <= MAX_SIZE):
        raise DifflabError(f"shapes renders at image_size {MIN_SIZE}..{MAX_SIZE}, got {image_size!r}")
    return int(image_size)


def check_pairs(pairs, what: str = "held_out") -> tuple[tuple[str, str], ...]:
    """Validate a list of (colour, shape) pairs; returns them as a tuple of lowercase tuples."""
    out = []
    for pair in pairs:
        if isinstance(pair, str) or len(pair) != 2:
            raise DifflabError(f"{what} must list (colour, shape) pairs, got {pair!r}")
        colour, shape = (str(p).strip().lower() for p in pair)
        if colour not in COLOURS or shape not in SHAPES:
            raise DifflabError(f"{what} has an unknown pair {tuple(pair)!r}: colours are {', '.join(COLOURS)}; "
                               f"shapes are {', '.join(SHAPES)}")
        out.append((colour, shape))
    return tuple(dict.fromkeys(out))


def all_pairs() -> tuple[tuple[str, str], ...]:
    """Every (colour, shape) pair, colours outermost."""
    return tuple((c, s) for c in COLOURS for s in SHAPES)


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _sizes(rng: np.random.Generator, size: int, k: int) -> list[float]:
    low, high = SINGLE_SIZE if k == 1 else PAIR_SIZE
    return [max(rng.uniform(low, high) * size, MIN_PIXELS) for _ in range(k)]


def _place_pair(rng: np.random.Generator, size: int, s: list[float], axis: int, sign: int,
                cross: bool) -> list[tuple[float, float]]:
    """Centres (px) of two objects of sides ``s`` with ``sign * (c1 - c0) >= (s0 + s1) / 2 + gap`` along
    ``axis`` (0: x, 1: y): their boxes cannot overlap. With ``cross`` the offset across the axis is at most
    CROSS_AXIS times the offset along it, so "left of" never looks like "above"."""
    border, gap = max(BORDER[0] * size, BORDER[1]), max(GAP[0] * size, GAP[1])
    lo = [border + si / 2 for si in s]  # the same range on both axes: the boxes are square
    hi = [size - border - si / 2 for si in s]
    need = (s[0] + s[1]) / 2 + gap
    for _ in range(100):  # the draws below almost always fit; retry the rare cross-axis miss
        # Along the axis: the signed offset d first, then where the pair sits, so that every allowed
        # d is reachable even at 16 px where the pair barely fits.
        first, second = (0, 1) if sign > 0 else (1, 0)  # `first` has the smaller coordinate
        d = rng.uniform(need, hi[second] - lo[first])
        a_lo, a_hi = max(lo[first], lo[second] - d), min(hi[first], hi[second] - d)
        a = [0.0, 0.0]
        a[first] = rng.uniform(a_lo, a_hi)
        a[second] = a[first] + d
        b0 = rng.uniform(lo[0], hi[0])
        b1 = rng.uniform(max(lo[1], b0 - CROSS_AXIS * d), min(hi[1], b0 + CROSS_AXIS * d)) if cross else \
            rng.uniform(lo[1], hi[1])
        if not cross or abs(b1 - b0) <= CROSS_AXIS * d:
            break
    else:
        raise AssertionError(f"no layout found at size {size}")  # the layout constants rule this out
    b = [b0, b1]
    return [(a[i], b[i]) if axis == 0 else (b[i], a[i]) for i in range(2)]


def make_scene(rng: np.random.Generator, image_size: int, pairs: Sequence[tuple[str, str]], *,
               required: Sequence[tuple[str, str]] | None = None, kind: str | None = None) -> Scene:
    """Draw one scene for an ``image_size`` image.

    Objects are (colour, shape) pairs from ``pairs``; with ``required``, at least one object is from
    ``required`` (a single or count scene uses a required pair; a relation scene pairs a required one
    with any other of ``pairs``, in random order). ``kind`` (one of KINDS) defaults to a uniform draw."""
    size = _check_size(image_size)
    if kind not in (None, *KINDS):
        raise DifflabError(f"unknown scene kind {kind!r}; use one of {', '.join(KINDS)}")
    kind = _pick(rng, KINDS) if kind is None else kind
    first = _pick(rng, required or pairs)
    if kind == "single":
        (s,) = _sizes(rng, size, 1)
        border = max(BORDER[0] * size, BORDER[1])
        cx, cy = rng.uniform(border + s / 2, size - border - s / 2, 2)
        objects, relation = [(first, cx, cy, s)], None
    else:
        s = _sizes(rng, size, 2)
        if kind == "count":
            relation, second = None, first
            axis, sign = int(rng.integers(2)), int(rng.choice([-1, 1]))
            centres = _place_pair(rng, size, s, axis, sign, cross=False)
        else:
            relation = _pick(rng, list(RELATIONS))
            second = _pick(rng, [p for p in pairs if p != first])
            if required and rng.integers(2):  # the required pair is the reference half of the time
                first, second = second, first
            axis, sign = {"left": (0, 1), "right": (0, -1), "above": (1, 1), "below": (1, -1)}[relation]
            centres = _place_pair(rng, size, s, axis, sign, cross=True)
        objects = [(first, *centres[0], s[0]), (second, *centres[1], s[1])]
    objs = tuple(Obj(c, sh, float(cx) / size, float(cy) / size, float(si) / size) for (c, sh), cx, cy, si in objects)
    return Scene(objs, relation, kind, caption([(o.colour, o.shape) for o in objs], relation))


def _split_pairs(split: str, held_out) -> tuple[tuple, tuple | None]:
    """(pairs, required) for make_scene: train uses only pairs not held out; test needs a held-out one."""
    held = check_pairs(held_out)
    if split in ("train", "seen"):
        allowed = tuple(p for p in all_pairs() if p not in held)
        if len(allowed) < 2:
            raise DifflabError(f"held_out leaves {len(allowed)} (colour, shape) pairs to train on; keep at least 2")
        return allowed, None
    if split in ("test", "held_out"):
        if not held:
            raise DifflabError(f"the {split!r} split needs at least one held-out (colour, shape) pair")
        return all_pairs(), held
    raise DifflabError(f"unknown split {split!r}; use 'train' or 'test'")


def make_scenes(split: str = "train", n: int | None = None, *, image_size: int = 32, seed: int = 0,
                held_out=DEFAULT_HELD_OUT) -> list[Scene]:
    """The scenes of ``load_shapes(split, image_size, n=n, seed=seed, held_out=held_out)``, without pixels."""
    if split not in ("train", "test"):
        raise DifflabError(f"unknown split {split!r}; use 'train' or 'test'")
    n = (20000 if split == "train" else 2000) if n is None else n
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise DifflabError(f"n must be a positive number of images, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise DifflabError(f"seed must be a non-negative integer, got {seed!r}")
    size = _check_size(image_size)
    pairs, required = _split_pairs(split, held_out)
    return [make_scene(np.random.default_rng([int(seed), STREAMS[split], i]), size, pairs, required=required)
            for i in range(int(n))]


def prompts(split: str = "seen", n: int = 300, seed: int = 0, *, held_out=DEFAULT_HELD_OUT) -> list[str]:
    """``n`` evaluation prompts, a third each single / count / relation (in turn), drawn from the training
    pairs (``split="seen"``) or each containing at least one held-out pair (``split="held_out"``)."""
    if split not in ("seen", "held_out"):
        raise DifflabError(f"prompts split must be 'seen' or 'held_out', got {split!r}")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise DifflabError(f"n must be a positive number of prompts, got {n!r}")
    pairs, required = _split_pairs(split, held_out)
    return [make_scene(np.random.default_rng([int(seed), STREAMS[split], i]), 32, pairs, required=required,
                       kind=KINDS[i % len(KINDS)]).caption for i in range(int(n))]


# ---------------------------------------------------------------------------------------------------
# Rendering. Each shape is a signed distance d (pixels, negative inside); a pixel's coverage is
# clip(0.5 - d, 0, 1), a one-pixel box filter -- the usual cheap antialiasing of font and vector renderers.
# Only +, -, *, /, sqrt and clip are used: all correctly rounded, so a pixel's value does not depend on
# how many images are rendered together.

_SQRT5 = float(np.sqrt(5.0))


def _distance(shape: str, x: np.ndarray, y: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Signed distance to a shape centred at the origin with half-side ``r``; x, y, r broadcast."""
    if shape == "circle":
        return np.sqrt(x * x + y * y) - r
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) - r
    # Triangle, apex up, base 2r and height 2r: the max of the distances to its base line and its two
    # sides (outward normals (+-2, -1) / sqrt(5)) is a convex polygon's. Near a sharp corner that max
    # underestimates the distance (the apex would blur 1.1 px upwards), so the bounding box clips it.
    return np.maximum(np.maximum(np.abs(x), np.abs(y)) - r, (2 * np.abs(x) - (y + r)) / _SQRT5)


def render_batch(scenes: Sequence[Scene], image_size: int, *, chunk: int = 1024) -> np.ndarray:
    """Render scenes to uint8 (N, H, W, 3). Objects never overlap, so their coverages simply add."""
    size = _check_size(image_size)
    out = np.empty((len(scenes), size, size, 3), np.uint8)
    grid = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
    palette = np.array([COLOURS[c] for c in COLOURS], np.float32)
    colour_id = {c: k for k, c in enumerate(COLOURS)}
    for start in range(0, len(scenes), chunk):
        part = scenes[start:start + chunk]
        canvas = np.zeros((len(part), size, size, 3), np.float32)
        for slot in range(max(len(s.objects) for s in part)):  # one object per image per slot: no repeats
            for shape in SHAPES:
                idx = [i for i, s in enumerate(part) if len(s.objects) > slot and s.objects[slot].shape == shape]
                if not idx:
                    continue
                objs = [part[i].objects[slot] for i in idx]
                cx, cy, r = (np.array([getattr(o, a) for o in objs], np.float32) * size for a in ("cx", "cy", "size"))
                x = grid[None, None, :] - cx[:, None, None]  # (M, 1, W)
                y = grid[None, :, None] - cy[:, None, None]  # (M, H, 1)
                cover = np.clip(0.5 - _distance(shape, x, y, r[:, None, None] / 2), 0, 1)  # (M, H, W)
                rgb = palette[[colour_id[o.colour] for o in objs]]  # (M, 3)
                canvas[idx] += cover[..., None] * rgb[:, None, None, :]
        out[start:start + len(part)] = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    return out


def render(scene: Scene, image_size: int) -> np.ndarray:
    """One scene as uint8 (H, W, 3)."""
    return render_batch([scene], image_size)[0]


def load_shapes(split: str = "train", image_size: int = 32, channels: int = 3, n: int | None = None,
                seed: int = 0, held_out=DEFAULT_HELD_OUT) -> ImageData:
    """The "shapes" dataset as :class:`ImageData` (uint8 (N, 3, H, W), one caption per image, no labels).

    Args:
        split: "train" (no held-out pair anywhere) or "test" (a held-out pair in every scene).
        image_size: side in pixels, 16..64; the layout scales with it.
        channels: must be 3: the captions name colours.
        n: number of images; 20000 for train and 2000 for test by default.
        seed: the scenes of (seed, split) are fixed; image i does not depend on n.
        held_out: the (colour, shape) pairs kept out of training (:data:`DEFAULT_HELD_OUT`).
    """
    if channels != 3:
        raise DifflabError(f"shapes is a colour dataset (its captions name colours): channels must be 3, "
                           f"got {channels!r}")
    scenes = make_scenes(split, n, image_size=image_size, seed=seed, held_out=held_out)
    images = render_batch(scenes, image_size).transpose(0, 3, 1, 2)  # (N, 3, H, W)
    return ImageData(torch.from_numpy(np.ascontiguousarray(images)), None, None, "shapes",
                     captions=[[s.caption] for s in scenes])
