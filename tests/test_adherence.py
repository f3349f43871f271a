"""The rule-based prompt-adherence checker (difflab.metrics.adherence) and the prompt grammar it reads
(difflab.data.shapes.parse_prompt): right on ground truth, and it catches images that are wrong."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from difflab.data import to_model_range
from difflab.data.shapes import COLOURS, RELATIONS, SHAPES, Obj, Scene, load_shapes, make_scenes, parse_prompt, render
from difflab.errors import DifflabError
from difflab.metrics.adherence import CATEGORIES, check_image, detect, format_adherence_table, score

OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


def scenes_of(kind, size=32, n=60, split="train", seed=5):
    return [s for s in make_scenes(split, 4 * n, image_size=size, seed=seed) if s.kind == kind][:n]


def with_objects(scene, objects):
    return dataclasses.replace(scene, objects=tuple(objects))


# ---------------------------------------------------------------------------------------------------
# Ground truth


@pytest.mark.parametrize("size", [16, 32, 64])
@pytest.mark.parametrize("split", ["train", "test"])
def test_ground_truth_passes(size, split):
    data = load_shapes(split, size, n=300, seed=11)
    captions = [c[0] for c in data.captions]
    result = score(data.images, captions)
    for cat in CATEGORIES:
        assert result["accuracy"][cat] >= 0.99, (cat, result["accuracy"])
    assert result["n"]["overall"] == 300
    assert result["n"]["position"] == sum(parse_prompt(c).relation is not None for c in captions) > 50


def test_float_images_score_like_uint8():
    data = load_shapes("test", 32, n=40)
    prompts = [c[0] for c in data.captions]
    assert score(to_model_range(data.images), prompts) == score(data.images, prompts)


def test_detect_reads_a_scene():
    scene = Scene((Obj("red", "circle", 0.25, 0.5, 0.3), Obj("cyan", "triangle", 0.75, 0.3, 0.3)), "left",
                  "relation", "a red circle to the left of a cyan triangle")
    found = detect(render(scene, 64))
    assert [(d.colour, d.shape) for d in found] == [("red", "circle"), ("cyan", "triangle")]  # largest first
    circle, triangle = found
    assert circle.cx == pytest.approx(0.25, abs=0.01) and circle.cy == pytest.approx(0.5, abs=0.01)
    assert circle.area == pytest.approx(np.pi * 0.15**2, rel=0.03) and triangle.area == pytest.approx(0.045, rel=0.05)
    assert triangle.cy == pytest.approx(0.3 + 0.3 / 6, abs=0.01)  # a triangle's centroid is a third up
    assert check_image(torch.from_numpy(render(scene, 64)), scene.caption)["overall"]  # tensors work too


def test_dimmer_and_noisy_images_still_pass():
    data = load_shapes("train", 32, n=200, seed=2)
    prompts = [c[0] for c in data.captions]
    dim = (data.images.float() * 0.75).round().to(torch.uint8)  # (191, 0, 0) is still red
    assert score(dim, prompts)["accuracy"]["overall"] >= 0.99
    for size in (16, 32):
        data = load_shapes("train", size, n=300, seed=3)
        noise = torch.randn(data.images.shape, generator=torch.Generator().manual_seed(0)) * 20  # sigma 20 / 255
        noisy = (data.images.float() + noise).round().clamp(0, 255).to(torch.uint8)
        assert score(noisy, [c[0] for c in data.captions])["accuracy"]["overall"] >= 0.98


def test_empty_and_grey_images_show_nothing():
    black, grey = np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 128, np.uint8)
    assert detect(black) == [] and detect(grey) == []
    result = check_image(black, "a red circle above a blue square")
    assert result == {"present": False, "count": False, "colour": False, "attribution": False, "position": False,
                      "overall": False}
    assert check_image(black, "a red circle")["position"] is None


def test_noise_and_a_tinted_background_are_not_objects():
    """A field of random palette colours holds every colour and, somewhere, every shape: it is noise and fails every
    category. A coloured region touching the border is a tinted background, never a (perfect) square."""
    rng = np.random.default_rng(0)
    palette = np.array([(0, 0, 0)] + list(COLOURS.values()), np.uint8)
    for size in (16, 32):
        noise = palette[rng.integers(0, len(palette), (size, size))]
        for prompt in ("a red circle", "two blue squares", "a green triangle to the left of a cyan circle"):
            assert not any(v for v in check_image(noise, prompt).values()), prompt
    tinted = np.zeros((32, 32, 3), np.uint8)
    tinted[:] = COLOURS["magenta"]
    assert detect(tinted) == []
    scene = Scene((Obj("green", "triangle", 0.5, 0.5, 0.4),), None, "single", "a green triangle")
    image = render(scene, 32)
    tinted = np.where((image.sum(-1) == 0)[..., None], np.array(COLOURS["magenta"], np.uint8), image)
    assert check_image(tinted, "a green triangle")["attribution"]  # the object on a tint is still read
    assert not check_image(tinted, "a magenta square")["present"]


# ---------------------------------------------------------------------------------------------------
# Deliberately wrong images are caught


@pytest.mark.parametrize("size", [16, 32, 64])
def test_wrong_colour_is_caught(size):
    for scene in scenes_of("single", size) + scenes_of("relation", size):
        obj = scene.objects[0]
        used = {o.colour for o in scene.objects}
        colour = next(c for c in COLOURS if c not in used)
        result = check_image(render(with_objects(scene, [dataclasses.replace(obj, colour=colour),
                                                         *scene.objects[1:]]), size), scene.caption)
        assert not result["attribution"] and not result["overall"], scene.caption
        assert result["present"]  # the shapes are all there
        if obj.colour not in {o.colour for o in scene.objects[1:]}:
            assert not result["colour"], scene.caption


@pytest.mark.parametrize("size", [16, 32, 64])
def test_wrong_shape_is_caught(size):
    for scene in scenes_of("single", size) + scenes_of("count", size) + scenes_of("relation", size):
        obj = scene.objects[0]
        shape = next(s for s in SHAPES if s not in {o.shape for o in scene.objects})
        result = check_image(render(with_objects(scene, [dataclasses.replace(obj, shape=shape),
                                                         *scene.objects[1:]]), size), scene.caption)
        assert not result["attribution"] and not result["overall"] and result["colour"], scene.caption
        if scene.kind != "relation" or scene.objects[1].shape != obj.shape:
            assert not result["present"] or scene.kind == "count", scene.caption
        if scene.kind == "count":
            assert not result["count"], scene.caption


@pytest.mark.parametrize("size", [16, 32, 64])
def test_swapped_positions_are_caught(size):
    scenes = scenes_of("relation", size, n=80)
    assert {s.relation for s in scenes} == set(OPPOSITE)
    for scene in scenes:
        image = render(scene, size)
        assert check_image(image, scene.caption)["position"], scene.caption
        # the same image, the opposite relation in the prompt
        a, b = scene.caption.split(f" {RELATIONS[scene.relation]} ")
        swapped = check_image(image, parse_prompt(f"{a} {RELATIONS[OPPOSITE[scene.relation]]} {b}"))
        assert swapped["position"] is False and swapped["attribution"] and not swapped["overall"]
        if scene.relation in ("left", "right"):  # the mirror image: everything right but where
            mirrored = check_image(np.ascontiguousarray(image[:, ::-1]), scene.caption)
            assert mirrored["position"] is False and mirrored["attribution"] and mirrored["count"], scene.caption


@pytest.mark.parametrize("size", [16, 32, 64])
def test_missing_object_is_caught(size):
    for scene in scenes_of("count", size) + scenes_of("relation", size):
        for keep in range(2):
            result = check_image(render(with_objects(scene, [scene.objects[keep]]), size), scene.caption)
            assert not result["count"] and not result["attribution"] and not result["overall"], scene.caption
            if scene.kind == "relation":
                assert result["position"] is False


@pytest.mark.parametrize("size", [16, 32, 64])
def test_extra_object_is_caught(size):
    # a lone object on the left half, a second one on the right half: the prompt names only the first
    for colour, shape, extra_colour, extra_shape in [("red", "circle", "blue", "square"),
                                                     ("green", "triangle", "green", "triangle"),
                                                     ("yellow", "square", "magenta", "circle")]:
        scene = Scene((Obj(colour, shape, 0.25, 0.4, 0.3), Obj(extra_colour, extra_shape, 0.72, 0.6, 0.3)), None,
                      "single", f"a {colour} {shape}")
        result = check_image(render(scene, size), scene.caption)
        assert result["present"] and result["colour"] and result["attribution"]
        assert not result["count"] and not result["overall"]
        alone = check_image(render(with_objects(scene, scene.objects[:1]), size), scene.caption)
        assert alone["overall"]  # the same object alone passes
    # "two red circles" with a third red circle
    three = Scene(tuple(Obj("red", "circle", x, 0.5, 0.2) for x in (0.17, 0.5, 0.83)), None, "count", "")
    assert len(detect(render(three, size))) == 3
    assert not check_image(render(three, size), "two red circles")["count"]
    assert check_image(render(with_objects(three, three.objects[:2]), size), "two red circles")["overall"]


def test_wrong_prompt_for_a_right_image():
    scene = scenes_of("single", 32, n=1)[0]
    obj = scene.objects[0]
    other_colour = next(c for c in COLOURS if c != obj.colour)
    other_shape = next(s for s in SHAPES if s != obj.shape)
    result = check_image(render(scene, 32), f"a {other_colour} {other_shape}")
    assert not any(result.values())  # position: None
    assert not check_image(render(scene, 32), f"two {obj.colour} {obj.shape}s")["count"]


# ---------------------------------------------------------------------------------------------------
# Grammar, score and table


@pytest.mark.parametrize("text, objects, relation", [
    ("a red circle", (("red", "circle"),), None),
    ("An  Cyan square.", (("cyan", "square"),), None),
    ("one blue triangle", (("blue", "triangle"),), None),
    ("magenta circle", (("magenta", "circle"),), None),
    ("Two GREEN triangles", (("green", "triangle"),) * 2, None),
    ("a red circle to the left of a blue square", (("red", "circle"), ("blue", "square")), "left"),
    ("a red circle left of a red square", (("red", "circle"), ("red", "square")), "left"),
    ("a yellow square on the right of a yellow circle", (("yellow", "square"), ("yellow", "circle")), "right"),
    ("a cyan triangle above a blue triangle", (("cyan", "triangle"), ("blue", "triangle")), "above"),
    ("one green square, below an red circle", (("green", "square"), ("red", "circle")), "below"),
])
def test_parse_prompt(text, objects, relation):
    spec = parse_prompt(text)
    assert spec.objects == objects and spec.count == len(objects)
    assert spec.relation == (None if relation is None else (objects[0], relation, objects[1]))
    assert spec.kind == ("relation" if relation else "count" if len(objects) == 2 else "single")
    assert parse_prompt(spec.text) == spec  # the canonical wording reads back the same


@pytest.mark.parametrize("text, fragment", [
    ("a purple circle", "'purple' is not a colour"),
    ("a red hexagon", "'hexagon' is not a shape"),
    ("two red circle", "two <colour> <shape>s"),
    ("red circles", "two <colour> <shape>s"),
    ("a red circle next to a blue square", "expected a relation"),
    ("a red circle left of a red circle", "must differ"),
    ("two red circles above a blue square", "one object to one object"),
    ("a red circle to the left of a blue square please", "unexpected words"),
    ("a red", "ends before"),
    ("", "empty prompt"),
])
def test_bad_prompts_are_one_line_errors(text, fragment):
    with pytest.raises(DifflabError) as err:
        parse_prompt(text)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    if text:
        assert "colours red" in str(err.value) or "must differ" in str(err.value)  # the grammar is named


def test_score_counts_and_table():
    scene = Scene((Obj("red", "circle", 0.5, 0.5, 0.4),), None, "single", "a red circle")
    image = torch.from_numpy(render(scene, 32)).permute(2, 0, 1)  # (3, H, W)
    images = torch.stack([image, torch.zeros_like(image)])
    result = score(images, ["a red circle", "a red circle"])
    assert result["accuracy"]["overall"] == 0.5 and result["n"]["overall"] == 2
    assert result["accuracy"]["position"] is None and result["n"]["position"] == 0
    table = format_adherence_table(result)
    assert all(cat in table for cat in CATEGORIES) and "50.0%" in table
    assert [line.split()[1] for line in table.splitlines()[1:] if line.startswith("position")] == ["-"]


@pytest.mark.parametrize("images, prompts, fragment", [
    (torch.zeros(2, 1, 16, 16, dtype=torch.uint8), ["a red circle"] * 2, "(N, 3, H, W)"),
    (torch.zeros(2, 3, 16, 16, dtype=torch.uint8), ["a red circle"], "one prompt per image"),
    (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), "a red circle", "one prompt per image"),
    (torch.zeros(1, 3, 16, 16, dtype=torch.int64), ["a red circle"], "uint8 pixels or floats"),
    (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), ["a red blob"], "not a shape"),
])
def test_score_input_errors(images, prompts, fragment):
    with pytest.raises(DifflabError, match=None) as err:
        score(images, prompts)
    assert fragment in str(err.value) and "\n" not in str(err.value)
