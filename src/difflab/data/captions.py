"""Captions: reading them beside a folder of images, making them from class labels, and the flat table the
training loop draws one caption per image from.

A folder is *captioned* in one of two ways (the first wins when both are present, with a warning):

1. ``metadata.jsonl`` (Hugging Face's "imagefolder" convention): one JSON object per line with
   ``file_name`` (relative to the folder holding that metadata file, forward slashes) and ``text`` (a
   string, or a list of strings: several captions). Several lines may name the same file; their captions
   add up. Other columns are ignored, and so are blank lines. Usually there is one file at the root; one
   in a subfolder (a class folder, say) names files relative to that subfolder.
2. A ``.txt`` beside each image (``cat.png`` + ``cat.txt``): one caption per non-empty line.

Every caption is stripped of surrounding whitespace; empty captions are refused, duplicates kept (they
weigh the draw). In a captioned folder every image needs at least one caption: the loader names those
that lack one rather than training on a silently smaller set.

For labelled datasets, :func:`caption_from_labels` fills templates such as ``"a photo of a {class}"``
with each image's class name, choosing "a" or "an" to match it.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import torch

from difflab.errors import DifflabError

__all__ = [
    "METADATA_FILE", "DEFAULT_TEMPLATES", "read_folder_captions", "caption_from_labels", "parse_templates",
    "fill_template", "caption_table", "draw_captions",
]

METADATA_FILE = "metadata.jsonl"
SHOW_MISSING = 3  # image names listed in the error about images without a caption
DEFAULT_TEMPLATES = ("a photo of a {class}", "a {class}", "an image of a {class}")
PLACEHOLDER = "{class}"
EXAMPLE_LINE = '{"file_name": "cat.png", "text": "a cat"}'


# ---------------------------------------------------------------------------------------------------
# Captioned folders


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path`` (a byte-order mark is allowed), or a one-line DifflabError naming it."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DifflabError(f"'{path}' is not UTF-8 text (bad byte at offset {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise DifflabError(f"cannot read '{path}': {e.strerror or e}") from None


def _lines(text: str) -> list[str]:
    # Split on newlines only: str.splitlines() would also split inside a JSON string holding U+2028.
    return [line.rstrip("\r") for line in text.split("\n")]


def _caption_list(text, where: str) -> list[str]:
    """``text`` (a string or a list of strings) -> stripped, non-empty captions, or an error ``where``."""
    items = text if isinstance(text, list) else [text]
    if not items:
        raise DifflabError(f"{where}: 'text' is an empty list; give at least one caption")
    captions = []
    for item in items:
        if not isinstance(item, str):
            raise DifflabError(f"{where}: 'text' must be a string or a list of strings, got "
                               f"{type(item).__name__} {json.dumps(item)[:40]}")
        if not item.strip():
            raise DifflabError(f"{where}: empty caption; write a caption or drop the line")
        captions.append(item.strip())
    return captions


def _image_key(base: str, file_name, where: str) -> str:
    """The path of ``file_name`` (from a metadata file in subfolder ``base``) relative to the dataset
    folder, in forward slashes; refuses names that are not plain relative paths."""
    if not isinstance(file_name, str) or not file_name.strip():
        raise DifflabError(f"{where}: 'file_name' must be a non-empty string, got {json.dumps(file_name)[:40]}")
    if "\\" in file_name:
        raise DifflabError(f"{where}: file_name {file_name!r} has a backslash; write paths with forward slashes")
    path = PurePosixPath(file_name)
    if path.is_absolute() or PureWindowsPath(file_name).drive:
        raise DifflabError(f"{where}: file_name {file_name!r} is absolute; write it relative to the folder of "
                           f"{METADATA_FILE}")
    if ".." in path.parts:
        raise DifflabError(f"{where}: file_name {file_name!r} leaves the folder of {METADATA_FILE} ('..'); "
                           f"name files inside it")
    return (PurePosixPath(base) / path).as_posix()


def read_metadata(path: Path, folder: Path, images: set[str]) -> dict[str, list[str]]:
    """Captions from one ``metadata.jsonl`` under ``folder``, keyed by image path relative to ``folder``
    (forward slashes). ``images`` are the keys of the images found, to name a caption for a missing file."""
    base = path.parent.relative_to(folder).as_posix()
    captions: dict[str, list[str]] = {}
    for number, line in enumerate(_lines(read_text(path)), start=1):
        if not line.strip():
            continue
        where = f"'{path}' line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DifflabError(f"{where} is not valid JSON ({e.msg} at column {e.colno}); write one object a "
                               f"line, like {EXAMPLE_LINE}") from None
        if not isinstance(row, dict):
            raise DifflabError(f"{where} is a JSON {type(row).__name__}, not an object; write one object a line, "
                               f"like {EXAMPLE_LINE}")
        absent = [k for k in ("file_name", "text") if k not in row]
        if absent:
            have = ", ".join(map(str, row)) or "none"
            raise DifflabError(f"{where} has no {' and no '.join(repr(k) for k in absent)} (its keys: {have}); "
                               f"each line needs both, like {EXAMPLE_LINE}")
        key = _image_key(base, row["file_name"], where)
        if key not in images:
            target = folder / key
            why = ("is not an image that is loaded (hidden, or not .png, .jpg, .jpeg or .webp)" if target.is_file()
                   else "does not exist")
            raise DifflabError(f"{where} captions {row['file_name']!r}, which {why}; fix the file_name or drop the "
                               f"line")
        captions.setdefault(key, []).extend(_caption_list(row["text"], where))
    return captions


def read_sidecar(path: Path) -> list[str]:
    """Captions from the ``.txt`` beside an image: one per non-empty line, stripped."""
    captions = [line.strip() for line in _lines(read_text(path)) if line.strip()]
    if not captions:
        raise DifflabError(f"'{path}' holds no caption (it is empty); write one caption a line, or delete it")
    return captions


def _find_caption_files(folder: Path) -> tuple[list[Path], set[Path]]:
    """All ``metadata.jsonl`` files (sorted, root first) and all ``.txt`` files under ``folder``; hidden
    files and folders are skipped, as for images."""
    metadata, texts = [], set()
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if f == METADATA_FILE:
                metadata.append(Path(root, f))
            elif f.endswith(".txt") and not f.startswith("."):
                texts.add(Path(root, f))
    return sorted(metadata, key=lambda p: p.relative_to(folder).parts), texts


def read_folder_captions(folder: Path, files: Sequence[Path]) -> list[list[str]] | None:
    """The captions of each image in ``files`` (image files under ``folder``), aligned with them; None when
    the folder has no captions (no ``metadata.jsonl`` and no ``.txt`` beside any image).

    ``metadata.jsonl`` wins over ``.txt`` sidecars when both exist (a warning says the .txt files are
    ignored). Raises a one-line :class:`DifflabError` for a malformed caption file, a caption for a file
    that is not among the images, or images without a caption.
    """
    metadata, texts = _find_caption_files(folder)
    sidecars = [f.with_suffix(".txt") for f in files]
    with_sidecar = sum(s in texts for s in sidecars)
    if metadata:
        keys = [f.relative_to(folder).as_posix() for f in files]
        found: dict[str, list[str]] = {}
        for path in metadata:
            for key, captions in read_metadata(path, folder, set(keys)).items():
                found.setdefault(key, []).extend(captions)
        if with_sidecar:
            warnings.warn(f"'{folder}' has both {METADATA_FILE} and .txt captions beside {with_sidecar} images; "
                          f"using {METADATA_FILE} and ignoring the .txt files", stacklevel=4)
        captions = [found.get(key) for key in keys]
        fix = f"add a line like {EXAMPLE_LINE} to {METADATA_FILE} for each"
    elif with_sidecar:
        captions = [read_sidecar(s) if s in texts else None for s in sidecars]
        fix = "write a .txt beside each (cat.png + cat.txt, one caption a line)"
    else:
        return None
    missing = [f.relative_to(folder).as_posix() for f, c in zip(files, captions) if c is None]
    if missing:
        names = ", ".join(missing[:SHOW_MISSING]) + (", ..." if len(missing) > SHOW_MISSING else "")
        raise DifflabError(f"{len(missing)} of {len(files)} images in captioned folder '{folder}' have no caption "
                           f"({names}); {fix}, or remove those images")
    return captions


# ---------------------------------------------------------------------------------------------------
# Captions from class labels

_ARTICLE = re.compile(r"\b(an?)(\s+)(?=\{class\})", re.IGNORECASE)  # "a {class}" / "an {class}"
_PLACEHOLDERS = re.compile(r"\{[^{}]*\}")
_SILENT_H = ("hour", "honest", "honor", "honour", "heir")  # "an hour"
_YOU_SOUND = ("uni", "use", "usu", "uten", "ufo", "eu", "ewe", "one", "once")  # "a unicorn", "a one-piece"


def _takes_an(word: str) -> bool:
    """Whether ``word`` (lowercase) starts with a vowel sound: "an apple", "an 8", "an 11", but "a unicorn",
    "a 1". A spelling rule with a few exceptions, not a pronouncing dictionary."""
    if word[:1].isdigit():  # "eight...", "eleven", "eighteen", "eleven thousand", ...
        return re.match(r"8|1[18](\d{3})*(?!\d)", word) is not None
    if word.startswith(_SILENT_H):
        return True
    return word[:1] in "aeiou" and not word.startswith(_YOU_SOUND)


def fill_template(template: str, name: str) -> str:
    """``template`` with every ``{class}`` replaced by ``name``, and an "a" / "an" right before it chosen to
    match ``name`` (keeping a capital: "A" / "An")."""

    def article(m: re.Match) -> str:
        word = "an" if _takes_an(name) else "a"
        return (word.capitalize() if m.group(1)[0].isupper() else word) + m.group(2)

    return _ARTICLE.sub(article, template).replace(PLACEHOLDER, name)


def check_templates(templates: Sequence[str]) -> list[str]:
    """The templates as a list, each checked to hold ``{class}`` and no other ``{...}`` placeholder."""
    if isinstance(templates, str):
        raise DifflabError(f"templates must be a list of strings, got the string {templates!r}; write "
                           f"[{templates!r}] (or use parse_templates for 'a|b')")
    templates = list(templates)
    if not templates:
        raise DifflabError(f"no caption templates given; give at least one, like {DEFAULT_TEMPLATES[0]!r}")
    for t in templates:
        if not isinstance(t, str):
            raise DifflabError(f"caption templates must be strings, got {type(t).__name__} {t!r}")
        if PLACEHOLDER not in t:
            raise DifflabError(f"caption template {t!r} has no {PLACEHOLDER} placeholder; write it where the class "
                               f"name goes, like {DEFAULT_TEMPLATES[0]!r}")
        other = [p for p in _PLACEHOLDERS.findall(t) if p != PLACEHOLDER]
        if other:
            raise DifflabError(f"caption template {t!r} has placeholder {other[0]}; the only placeholder is "
                               f"{PLACEHOLDER}")
    return templates


def parse_templates(spec: str) -> list[str]:
    """Templates from a command-line value, separated by ``|``: ``"a photo of a {class}|a {class}"``.
    Surrounding spaces and empty pieces are dropped; each template is checked."""
    templates = [t.strip() for t in str(spec).split("|") if t.strip()]
    if not templates:
        raise DifflabError(f"no caption templates in {spec!r}; separate them with '|', like "
                           f"'a photo of a {{class}}|a {{class}}'")
    return check_templates(templates)


def caption_from_labels(labels: torch.Tensor | np.ndarray, class_names: list[str],
                        templates: Sequence[str] = DEFAULT_TEMPLATES) -> list[list[str]]:
    """Captions for a labelled dataset: for each image, every template filled with its class name.

    The class name is lowercased and its underscores become spaces (folder names like ``golden_retriever``);
    anything else, such as the "/" in "T-shirt/top", stays. "a" / "an" before ``{class}`` follows the name:
    ``caption_from_labels([0], ["Ankle boot"], ["a photo of a {class}"]) == [["a photo of an ankle boot"]]``.
    """
    templates = check_templates(templates)
    values = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if values.ndim != 1 or not (values.size == 0 or np.issubdtype(values.dtype, np.integer)):
        raise DifflabError(f"labels must be a 1-D array of class indices, got shape {tuple(values.shape)} and "
                           f"dtype {values.dtype}")
    if values.size and (values.min() < 0 or values.max() >= len(class_names)):
        raise DifflabError(f"labels run from {values.min()} to {values.max()} but there are {len(class_names)} "
                           f"class names; pass the dataset's class_names")
    names = [" ".join(str(n).replace("_", " ").lower().split()) for n in class_names]
    per_class = [[fill_template(t, n) for t in templates] for n in names]
    return [list(per_class[i]) for i in values.tolist()]


# ---------------------------------------------------------------------------------------------------
# The caption table: per-image caption lists as CSR arrays, for drawing one caption per image per step


def caption_table(captions: list[list[str]]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Per-image caption lists -> ``(texts, offsets, flat)``.

    ``texts`` are the distinct captions in first-seen order (so a text encoder runs once per text);
    image ``i``'s captions are ``texts[j]`` for ``j`` in ``flat[offsets[i]:offsets[i + 1]]``;
    ``offsets`` is int64 (N + 1,), ``flat`` int64 (M,) with M the number of (image, caption) pairs.
    """
    index: dict[str, int] = {}
    flat, offsets = [], [0]
    for i, image_captions in enumerate(captions):
        if not image_captions:
            raise DifflabError(f"image {i} has no caption; every image needs at least one")
        for text in image_captions:
            flat.append(index.setdefault(text, len(index)))
        offsets.append(len(flat))
    return list(index), torch.tensor(offsets, dtype=torch.long), torch.tensor(flat, dtype=torch.long)


def draw_captions(offsets: torch.Tensor, flat: torch.Tensor, idx: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """For each image index in ``idx``, the index into ``texts`` of one of its captions, uniformly at random.

    Exactly one uniform number is drawn from ``generator`` per example (on the generator's device), so the
    stream stays aligned whatever the caption counts. Returns int64 shaped like ``idx``, on ``idx``'s device
    (``offsets`` and ``flat`` are moved there; keep them there to avoid a copy each step).
    """
    device = idx.device
    offsets, flat, idx = offsets.to(device), flat.to(device), idx.long()
    start = offsets[idx]
    count = offsets[idx + 1] - start  # >= 1, as caption_table guarantees
    u = torch.rand(idx.shape, generator=generator, device=generator.device if generator is not None else device)
    pick = (u.to(device) * count).long().clamp_max(count - 1)  # float32 u * count may round up to count
    return flat[start + pick]
