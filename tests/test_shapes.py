"""The procedural captioned dataset "shapes" (difflab.data.shapes): determinism, held-out pairs, sizes,
errors, captions and layout. The adherence checker has its own tests (test_adherence.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difflab.data import load_dataset
from difflab.data.shapes import (
    COLOURS,
    DEFAULT_HELD_OUT,
    KINDS,
    MIN_PIXELS,
    SHAPES,
    load_shapes,
    make_scenes,
    parse_prompt,
    prompts,
    render,
    render_batch,
)
from difflab.errors import DifflabError
from difflab.metrics.adherence import DEAD_ZONE, detect


def pairs_of(scene):
    return [(o.colour, o.shape) for o in scene.objects]


def test_palette_shapes_and_defaults():
    assert len(COLOURS) >= 6 and set(SHAPES) >= {"circle", "square", "triangle"}
    assert all(c in COLOURS and s in SHAPES for c, s in DEFAULT_HELD_OUT) and len(DEFAULT_HELD_OUT) >= 3
    # every held-out colour and shape is still seen in training, only not together
    seen = {p for s in make_scenes("train", 600, image_size=16) for p in pairs_of(s)}
    for colour, shape in DEFAULT_HELD_OUT:
        assert any(c == colour for c, _ in seen) and any(s == shape for _, s in seen)


def test_same_seed_same_bytes_and_prefix_stable():
    a = load_shapes("train", 24, n=40, seed=3)
    b = load_shapes("train", 24, n=40, seed=3)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    head = load_shapes("train", 24, n=13, seed=3)
    assert torch.equal(head.images, a.images[:13]) and head.captions == a.captions[:13]
    # rendering in chunks or one by one gives the same pixels
    scenes = make_scenes("train", 40, image_size=24, seed=3)
    assert np.array_equal(render_batch(scenes, 24, chunk=7), a.images.permute(0, 2, 3, 1).numpy())
    assert np.array_equal(render(scenes[5], 24), a.images[5].permute(1, 2, 0).numpy())


def test_different_seeds_and_splits_differ():
    a, b = load_shapes("train", 32, n=20, seed=0), load_shapes("train", 32, n=20, seed=1)
    test = load_shapes("test", 32, n=20, seed=0)
    assert a.captions != b.captions and not torch.equal(a.images, b.images)
    assert not any(torch.equal(x, y) for x, y in zip(a.images, test.images))


def test_image_data_contract():
    data = load_shapes("test", 32, n=30)
    assert data.images.dtype == torch.uint8 and data.images.shape == (30, 3, 32, 32)
    assert data.labels is None and data.class_names is None and data.name == "shapes"
    assert len(data.captions) == 30 and all(len(c) == 1 and isinstance(c[0], str) for c in data.captions)
    assert data.images.amax() == 255 and data.images.float().mean() < 100  # bright shapes on black


def test_load_dataset_routes_to_shapes():
    data = load_dataset("shapes", split="test", image_size=16)  # default n: 2000 test images
    assert len(data) == 2000 and data.name == "shapes"
    assert torch.equal(data.images[:50], load_shapes("test", 16, n=50).images)
    with pytest.raises(DifflabError, match="colour"):
        load_dataset("shapes", channels=1)


def test_default_sizes():
    assert len(make_scenes("train", image_size=16)) == 20000
    assert len(make_scenes("test", image_size=16)) == 2000


def test_held_out_pairs_never_in_train():
    held = set(DEFAULT_HELD_OUT)
    scenes = make_scenes("train", 3000, image_size=32)
    assert not any(p in held for s in scenes for p in pairs_of(s))
    assert {s.kind for s in scenes} == set(KINDS)
    # ... and the checker, reading the rendered pixels, agrees
    images = render_batch(scenes[:300], 32)
    found = [(d.colour, d.shape) for img in images for d in detect(img)]
    assert len(found) == sum(len(s.objects) for s in scenes[:300])  # it does see the objects
    assert not held & set(found)


def test_test_split_always_has_a_held_out_pair():
    held = set(DEFAULT_HELD_OUT)
    scenes = make_scenes("test", 1000, image_size=32)
    assert all(held & set(pairs_of(s)) for s in scenes)
    assert {p for s in scenes for p in pairs_of(s)} > held  # held-out pairs meet seen ones in relations
    for scene, img in zip(scenes[:200], render_batch(scenes[:200], 32)):
        assert held & {(d.colour, d.shape) for d in detect(img)}, scene.caption


def test_custom_held_out():
    custom = [("Cyan", "SQUARE"), ("yellow", "circle")]  # case does not matter
    held = {("cyan", "square"), ("yellow", "circle")}
    train = make_scenes("train", 1000, image_size=16, held_out=custom)
    test = make_scenes("test", 300, image_size=16, held_out=custom)
    assert not any(p in held for s in train for p in pairs_of(s))
    assert any(p in set(DEFAULT_HELD_OUT) for s in train for p in pairs_of(s))  # the defaults are back in
    assert all(held & set(pairs_of(s)) for s in test)


@pytest.mark.parametrize("size", range(16, 65))
def test_every_size_renders(size):
    data = load_shapes("train", size, n=12, seed=size)
    assert data.images.shape == (12, 3, size, size)
    edges = torch.cat([data.images[..., 0, :], data.images[..., -1, :], data.images[..., 0], data.images[..., -1]])
    assert edges.max() == 0  # objects keep off the border
    for scene in make_scenes("train", 12, image_size=size, seed=size):
        for o in scene.objects:
            assert o.size * size >= MIN_PIXELS - 1e-9
            assert o.size / 2 < o.cx < 1 - o.size / 2 and o.size / 2 < o.cy < 1 - o.size / 2


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(image_size=15), "16..64"),
    (dict(image_size=65), "16..64"),
    (dict(image_size=32.0), "16..64"),
    (dict(channels=1), "channels must be 3"),
    (dict(held_out=[("purple", "circle")]), "colours are red"),
    (dict(held_out=[("red", "hexagon")]), "shapes are circle"),
    (dict(held_out=["red triangle"]), "(colour, shape) pairs"),
    (dict(held_out=[(c, s) for c in COLOURS for s in SHAPES][:-1]), "keep at least 2"),
    (dict(split="test", held_out=()), "at least one held-out"),
    (dict(split="validation"), "unknown split"),
    (dict(n=0), "positive"),
    (dict(seed=-1), "non-negative"),
])
def test_user_mistakes_are_one_line_errors(kwargs, fragment):
    with pytest.raises(DifflabError) as err:
        load_shapes(**{"n": 4, **kwargs})
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_captions_name_colour_shape_count_and_relation():
    for scene in make_scenes("test", 300, image_size=32) + make_scenes("train", 300, image_size=32):
        spec = parse_prompt(scene.caption)
        assert spec.text == scene.caption and spec.kind == scene.kind
        assert list(spec.objects) == pairs_of(scene)
        for colour, shape in pairs_of(scene):
            assert colour in scene.caption and shape in scene.caption
        if scene.kind == "count":
            assert scene.caption.startswith("two ") and scene.objects[0].shape + "s" in scene.caption
        if scene.kind == "relation":
            assert spec.relation == (pairs_of(scene)[0], scene.relation, pairs_of(scene)[1])


def test_two_object_layouts_do_not_overlap_and_relations_hold():
    for size in (16, 32, 64):
        for scene in make_scenes("train", 400, image_size=size, seed=size):
            if len(scene.objects) < 2:
                continue
            a, b = scene.objects
            reach = (a.size + b.size) / 2  # boxes are apart along at least one axis
            assert max(abs(a.cx - b.cx), abs(a.cy - b.cy)) >= reach + 1.9 / size
            if scene.relation is None:
                assert pairs_of(scene)[0] == pairs_of(scene)[1]
                continue
            along, across = {"left": (b.cx - a.cx, a.cy - b.cy), "right": (a.cx - b.cx, a.cy - b.cy),
                             "above": (b.cy - a.cy, a.cx - b.cx), "below": (a.cy - b.cy, a.cx - b.cx)}[scene.relation]
            assert along >= 2 * DEAD_ZONE and abs(across) <= 0.5 * along, scene


def test_prompts_are_balanced_and_respect_the_split():
    held = set(DEFAULT_HELD_OUT)
    seen, unseen = prompts("seen", 90, seed=1), prompts("held_out", 90, seed=1)
    assert seen == prompts("seen", 90, seed=1) and seen != prompts("seen", 90, seed=2)
    for texts, want_held in ((seen, False), (unseen, True)):
        specs = [parse_prompt(t) for t in texts]
        assert [s.kind for s in specs] == [KINDS[i % 3] for i in range(90)]
        assert all(bool(held & set(s.objects)) == want_held for s in specs)
    with pytest.raises(DifflabError, match="'seen' or 'held_out'"):
        prompts("train", 10)
