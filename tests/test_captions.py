"""Captions: captioned folders (metadata.jsonl and .txt sidecars), captions from class labels through
templates, and the caption table the training loop draws from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.data import load_dataset
from difflab.data.captions import (
    DEFAULT_TEMPLATES,
    caption_from_labels,
    caption_table,
    draw_captions,
    fill_template,
    parse_templates,
)
from difflab.errors import DifflabError


def grey(path: Path, value: int) -> Path:
    """A 4x4 PNG of one grey level, so that a test can tell which image landed where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4), value, np.uint8)).save(path)
    return path


def jsonl(path: Path, *rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def load(folder: Path):
    return load_dataset(str(folder), progress=False, captions=True)


def values(d) -> list[int]:
    return d.images[:, 0, 0, 0].tolist()


def error(folder: Path, *fragments: str) -> str:
    """Load ``folder``, expect a one-line DifflabError holding every fragment; return the message."""
    with pytest.raises(DifflabError) as e:
        load(folder)
    message = str(e.value)
    assert message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---------------------------------------------------------------------------------------------------
# metadata.jsonl


def test_metadata_jsonl_lists_repeated_lines_subfolders_and_other_columns(tmp_path):
    grey(tmp_path / "a.png", 10)
    grey(tmp_path / "sub" / "b.png", 20)
    grey(tmp_path / "sub" / "deeper" / "c.png", 30)
    jsonl(tmp_path / "metadata.jsonl",
          {"file_name": "sub/b.png", "text": ["  a dog ", "a brown dog"], "score": 0.9},
          "",  # blank lines are skipped
          {"file_name": "a.png", "text": "a cat"},
          {"file_name": "./sub/b.png", "text": "a dog on grass"},  # the same file again: captions add up
          {"file_name": "sub/deeper/c.png", "text": "a bird", "extra": {"x": 1}})
    d = load(tmp_path)
    assert values(d) == [10, 20, 30] and d.labels is None
    assert d.captions == [["a cat"], ["a dog", "a brown dog", "a dog on grass"], ["a bird"]]


def test_metadata_in_a_subfolder_names_files_relative_to_it(tmp_path):
    grey(tmp_path / "x" / "a.png", 1)
    grey(tmp_path / "y" / "b.png", 2)
    jsonl(tmp_path / "metadata.jsonl", {"file_name": "x/a.png", "text": "first"})
    jsonl(tmp_path / "y" / "metadata.jsonl", {"file_name": "b.png", "text": "second"},
          {"file_name": "b.png", "text": "third"})
    d = load(tmp_path)
    assert d.captions == [["first"], ["second", "third"]]


def test_class_subfolders_and_captions_coexist(tmp_path):
    grey(tmp_path / "cats" / "1.png", 1)
    grey(tmp_path / "cats" / "2.png", 2)
    grey(tmp_path / "dogs" / "3.png", 3)
    jsonl(tmp_path / "metadata.jsonl", {"file_name": "dogs/3.png", "text": "a dog"},
          {"file_name": "cats/2.png", "text": "a grey cat"}, {"file_name": "cats/1.png", "text": "a black cat"})
    d = load(tmp_path)
    assert d.class_names == ["cats", "dogs"] and d.labels.tolist() == [0, 0, 1]
    assert d.captions == [["a black cat"], ["a grey cat"], ["a dog"]]


def test_folder_without_captions_has_none(tmp_path):
    grey(tmp_path / "a.png", 1)
    (tmp_path / "notes.txt").write_text("not beside any image")
    assert load(tmp_path).captions is None


def test_undecodable_image_drops_its_caption(tmp_path):
    grey(tmp_path / "a.png", 10)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    grey(tmp_path / "c.png", 30)
    jsonl(tmp_path / "metadata.jsonl", {"file_name": "a.png", "text": "first"},
          {"file_name": "broken.png", "text": "lost"}, {"file_name": "c.png", "text": "third"})
    with pytest.warns(UserWarning, match="skipped 1 of 3"):
        d = load(tmp_path)
    assert d.skipped == 1 and values(d) == [10, 30] and d.captions == [["first"], ["third"]]


@pytest.mark.parametrize("lines, fragments", [
    (['{"file_name": "a.png", "text": "ok"}', '{"file_name": "b.png", "text": }'],
     ["line 2 is not valid JSON", "column"]),
    (['["a.png", "a cat"]'], ["line 1 is a JSON list, not an object"]),
    (['{"file_name": "a.png"}'], ["line 1 has no 'text'", "its keys: file_name"]),
    (['{"image": "a.png", "caption": "a cat"}'], ["has no 'file_name' and no 'text'", "image, caption"]),
    (['{"file_name": "a.png", "text": 5}'], ["line 1", "must be a string or a list of strings", "int 5"]),
    (['{"file_name": "a.png", "text": ["ok", null]}'], ["line 1", "NoneType null"]),
    (['{"file_name": "a.png", "text": "   "}'], ["line 1: empty caption"]),
    (['{"file_name": "a.png", "text": []}'], ["line 1: 'text' is an empty list"]),
    (['{"file_name": 3, "text": "x"}'], ["line 1: 'file_name' must be a non-empty string"]),
    (['{"file_name": "/abs/a.png", "text": "x"}'], ["'/abs/a.png' is absolute"]),
    (['{"file_name": "C:/a.png", "text": "x"}'], ["'C:/a.png' is absolute"]),
    (['{"file_name": "../a.png", "text": "x"}'], ["'../a.png' leaves the folder", "'..'"]),
    (['{"file_name": "sub\\\\a.png", "text": "x"}'], ["backslash", "forward slashes"]),
    (['{"file_name": "a.png", "text": "x"}', '{"file_name": "gone.png", "text": "x"}'],
     ["line 2 captions 'gone.png', which does not exist"]),
    (['{"file_name": "notes.md", "text": "x"}'], ["'notes.md', which is not an image that is loaded"]),
])
def test_metadata_errors_name_the_file_and_line(tmp_path, lines, fragments):
    grey(tmp_path / "a.png", 1)
    (tmp_path / "notes.md").write_text("hello")
    path = jsonl(tmp_path / "metadata.jsonl", *lines)
    error(tmp_path, f"'{path}' ", *fragments)


def test_images_without_a_caption_are_named(tmp_path):
    for i in range(5):
        grey(tmp_path / f"{i}.png", i)
    jsonl(tmp_path / "metadata.jsonl", {"file_name": "2.png", "text": "two"})
    error(tmp_path, "4 of 5 images in captioned folder", "(0.png, 1.png, 3.png, ...)", "metadata.jsonl",
          "or remove those images")


def test_runs_that_do_not_need_captions_load_a_folder_whose_captions_are_incomplete(tmp_path):
    """An imagefolder whose metadata.jsonl has no text column (only labels, say), or a few stray .txt files, is still
    a folder of images: unless captions are required it loads without them, with a warning, or without reading them."""
    for i in range(3):
        grey(tmp_path / f"{i}.png", i)
    jsonl(tmp_path / "metadata.jsonl", {"file_name": "0.png", "label": 3})
    with pytest.warns(UserWarning, match="without captions"):
        data = load_dataset(str(tmp_path), progress=False)
    assert data.captions is None and len(data) == 3
    assert load_dataset(str(tmp_path), progress=False, captions=False).captions is None
    error(tmp_path, "metadata.jsonl")  # required: the mistake is an error


def test_non_utf8_caption_files_are_named(tmp_path):
    grey(tmp_path / "j" / "a.png", 1)
    (tmp_path / "j" / "metadata.jsonl").write_bytes('{"file_name": "a.png", "text": "café"}\n'.encode("latin-1"))
    error(tmp_path / "j", f"'{tmp_path / 'j' / 'metadata.jsonl'}' is not UTF-8", "save it as UTF-8")
    grey(tmp_path / "t" / "a.png", 1)
    (tmp_path / "t" / "a.txt").write_bytes("café".encode("latin-1"))
    error(tmp_path / "t", f"'{tmp_path / 't' / 'a.txt'}' is not UTF-8")


def test_byte_order_mark_and_crlf_are_accepted(tmp_path):
    grey(tmp_path / "a.png", 1)
    (tmp_path / "metadata.jsonl").write_bytes(b'\xef\xbb\xbf{"file_name": "a.png", "text": "a cat"}\r\n')
    assert load(tmp_path).captions == [["a cat"]]


# ---------------------------------------------------------------------------------------------------
# .txt sidecars


def test_txt_sidecars_one_caption_per_line(tmp_path):
    grey(tmp_path / "cat.png", 1)
    grey(tmp_path / "sub" / "dog.png", 2)
    (tmp_path / "cat.txt").write_text("a cat\n\n  a sleeping cat  \r\n", encoding="utf-8")
    (tmp_path / "sub" / "dog.txt").write_text("a dog", encoding="utf-8")
    assert load(tmp_path).captions == [["a cat", "a sleeping cat"], ["a dog"]]


def test_txt_sidecar_errors(tmp_path):
    grey(tmp_path / "cat.png", 1)
    grey(tmp_path / "dog.png", 2)
    (tmp_path / "cat.txt").write_text("a cat")
    error(tmp_path, "1 of 2 images", "(dog.png)", "write a .txt beside each")
    (tmp_path / "dog.txt").write_text(" \n\n")
    error(tmp_path, f"'{tmp_path / 'dog.txt'}' holds no caption")


def test_metadata_wins_over_txt_with_a_warning(tmp_path):
    grey(tmp_path / "cat.png", 1)
    (tmp_path / "cat.txt").write_text("from the txt")
    jsonl(tmp_path / "metadata.jsonl", {"file_name": "cat.png", "text": "from the jsonl"})
    with pytest.warns(UserWarning, match="using metadata.jsonl and ignoring the .txt files"):
        d = load(tmp_path)
    assert d.captions == [["from the jsonl"]]


# ---------------------------------------------------------------------------------------------------
# Templates


def test_caption_from_labels_fills_every_template_with_a_or_an():
    names = ["T-shirt/top", "Ankle boot", "airplane", "golden_retriever", "8", "1", "11", "110", "Unicorn", "hour"]
    caps = caption_from_labels(torch.arange(len(names)), names)
    assert all(len(c) == len(DEFAULT_TEMPLATES) for c in caps)
    assert [c[0] for c in caps] == [
        "a photo of a t-shirt/top", "a photo of an ankle boot", "a photo of an airplane",
        "a photo of a golden retriever", "a photo of an 8", "a photo of a 1", "a photo of an 11",
        "a photo of a 110", "a photo of a unicorn", "a photo of an hour"]
    assert caps[1] == ["a photo of an ankle boot", "an ankle boot", "an image of an ankle boot"]
    assert caption_from_labels(np.array([1, 1, 0]), ["cat", "eel"], ["{class}"]) == [["eel"], ["eel"], ["cat"]]


def test_fill_template_only_touches_the_article_before_the_class():
    assert fill_template("A {class} and a cat", "owl") == "An owl and a cat"
    assert fill_template("an {class}", "dog") == "a dog"
    assert fill_template("banana {class}, a {class}", "eel") == "banana eel, an eel"


def test_template_validation_and_parsing():
    assert parse_templates(" a photo of a {class} | {class} drawing ||") == ["a photo of a {class}", "{class} drawing"]
    for templates, match in [(["a photo"], "has no {class} placeholder"), (["a {label}"], "no {class}"),
                             (["a {class} {n}"], "has placeholder {n}"), ([], "no caption templates"),
                             ("a {class}", "list of strings"), ([3], "must be strings")]:
        with pytest.raises(DifflabError, match=match) as e:
            caption_from_labels([0], ["cat"], templates)
        assert "\n" not in str(e.value)
    for spec in ["", " | "]:
        with pytest.raises(DifflabError, match="no caption templates"):
            parse_templates(spec)
    with pytest.raises(DifflabError, match="has no"):
        parse_templates("a {class}|oops")
    with pytest.raises(DifflabError, match="2 class names"):
        caption_from_labels([0, 2], ["a", "b"])
    with pytest.raises(DifflabError, match="1-D array of class indices"):
        caption_from_labels(np.array([0.5]), ["a"])


# ---------------------------------------------------------------------------------------------------
# Caption table and drawing


def test_caption_table_is_csr_in_first_seen_order():
    texts, offsets, flat = caption_table([["a", "b"], ["c"], ["b", "a", "d"]])
    assert texts == ["a", "b", "c", "d"]
    assert offsets.dtype == flat.dtype == torch.long
    assert offsets.tolist() == [0, 2, 3, 6] and flat.tolist() == [0, 1, 2, 1, 0, 3]
    with pytest.raises(DifflabError, match="image 1 has no caption"):
        caption_table([["a"], []])


def test_draw_captions_covers_every_caption_and_is_deterministic():
    captions = [["a", "b", "c"], ["d"], ["e", "f"]]
    texts, offsets, flat = caption_table(captions)
    idx = torch.tensor([0, 1, 2, 0]).repeat(500)
    drawn = draw_captions(offsets, flat, idx, torch.Generator().manual_seed(0))
    assert drawn.shape == idx.shape and drawn.dtype == torch.long
    for i, image_captions in enumerate(captions):
        got = [texts[j] for j in drawn[idx == i].tolist()]
        assert set(got) == set(image_captions)  # only its own captions, and every one of them
        counts = np.array([got.count(t) for t in image_captions])
        assert counts.min() > 0.8 * len(got) / len(image_captions)  # roughly uniform
    again = draw_captions(offsets, flat, idx, torch.Generator().manual_seed(0))
    assert torch.equal(drawn, again)
    other = draw_captions(offsets, flat, idx, torch.Generator().manual_seed(1))
    assert not torch.equal(drawn, other)
    # one draw per example: a prefix of the batch draws the same captions
    assert torch.equal(draw_captions(offsets, flat, idx[:7], torch.Generator().manual_seed(0)), drawn[:7])
