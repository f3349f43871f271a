"""Datasets: the bundled UCI digits, Fashion-MNIST and MNIST (IDX files), CIFAR-10 (the python archive)
and any folder of images, each loaded whole into memory as uint8 ``(N, C, H, W)``.

    data = load_dataset("fashion-mnist", image_size=32)    # ImageData(images, labels, class_names, name)
    x0 = to_model_range(data.images[:64])                   # float in [-1, 1], what the models see

Where files are looked for, in order (first hit wins):

1. ``data_dir``, when given: the files directly in it, or in a subfolder named like the dataset
   (``fashion-mnist``, ``mnist``, ``cifar10``; torchvision's ``FashionMNIST/raw`` and ``MNIST/raw`` too).
   For CIFAR-10 ``data_dir`` may also be the ``cifar-10-python.tar.gz`` file or the extracted
   ``cifar-10-batches-py`` folder.
2. For Fashion-MNIST, ``/usr/share/datasets/fashion-mnist`` (Debian: ``apt-get install dataset-fashion-mnist``;
   where it is not installed, the files are downloaded into the cache as below).
3. The cache, ``$DIFFLAB_CACHE`` or ``~/.cache/difflab``, subfolder named like the dataset.
4. With ``download=True``: the official files, checked against their published MD5 and saved in the cache.

Sizes: ``image_size=None`` and ``channels=None`` keep a named dataset's native size (digits 8x8x1,
MNIST / Fashion-MNIST 28x28x1, CIFAR-10 32x32x3); a folder loads as RGB at the one square size its
images share, or at 64x64 when their sizes differ or are not square. Otherwise every image is converted (L <-> RGB) and its
largest centred square is resized with an antialiased bicubic filter (see :mod:`difflab.data.folders`).
"""

from __future__ import annotations

import io
import numbers
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from difflab.data.download import cache_dir, download_file, download_first
from difflab.data.folders import IMAGE_EXTENSIONS, fit_array, load_image_folder
from difflab.data.formats import CIFAR_FOLDER, CIFAR_META, RestrictedUnpickler, parse_idx, read_cifar10, read_idx
from difflab.errors import DifflabError

__all__ = [
    "ImageData", "load_dataset", "dataset_names", "to_model_range", "from_model_range",
    "read_idx", "parse_idx", "read_cifar10", "RestrictedUnpickler", "cache_dir", "download_file",
    "IMAGE_EXTENSIONS",
]


@dataclass
class ImageData:
    """A whole dataset in memory."""

    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor | None  # int64 (N,), class indices into class_names; None for unlabelled folders
    class_names: list[str] | None
    name: str  # "digits", "fashion-mnist", "mnist", "cifar10" or "folder:<absolute path>"
    skipped: int = 0  # image files of a folder that could not be decoded and were left out
    captions: list[list[str]] | None = None  # per image, one or more captions (captioned folders, shapes)

    def __post_init__(self) -> None:
        assert self.images.dtype == torch.uint8 and self.images.ndim == 4, "images must be uint8 (N, C, H, W)"
        if self.labels is not None:
            assert self.labels.dtype == torch.int64 and self.labels.shape == self.images.shape[:1]
            assert self.class_names is not None and bool((self.labels < len(self.class_names)).all())
        if self.captions is not None:
            assert len(self.captions) == len(self.images) and all(self.captions), "every image needs a caption"

    def __len__(self) -> int:
        return self.images.shape[0]


def to_model_range(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels 0..255 -> floats in [-1, 1]: ``x / 127.5 - 1``."""
    if images.dtype != torch.uint8:
        raise DifflabError(f"to_model_range expects uint8 pixels, got {images.dtype}; pass ImageData.images")
    return images.to(dtype) / 127.5 - 1


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """Floats in [-1, 1] -> uint8 pixels, clamped and rounded; the exact inverse of :func:`to_model_range`.
    NaN becomes mid-grey (128) rather than an arbitrary value."""
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return ((x.nan_to_num(0.0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------------
# Named datasets. Checksums are the published ones: Fashion-MNIST's README (zalandoresearch/fashion-mnist)
# and torchvision's datasets/mnist.py and datasets/cifar.py (which also name these download locations).

SPLITS = ("train", "test")
IDX_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IDX_DATASETS = {
    "fashion-mnist": dict(
        mirrors=["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        md5={"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
             "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
             "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
             "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
        subfolders=["fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "fashion"],
        system=["/usr/share/datasets/fashion-mnist"],
        hint="install it with `apt-get install dataset-fashion-mnist`, pass data_dir=<folder with the IDX files>",
        classes=["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]),
    "mnist": dict(
        mirrors=["https://ossci-datasets.s3.amazonaws.com/mnist/"],
        md5={"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
             "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
             "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
             "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
        subfolders=["mnist", "MNIST/raw"],
        system=[],
        hint="pass data_dir=<folder with the IDX files>",
        classes=[str(d) for d in range(10)]),
}
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_SUBFOLDERS = ["cifar10", "cifar-10"]


def dataset_names() -> list[str]:
    """Names :func:`load_dataset` knows besides folder paths."""
    return ["digits", "fashion-mnist", "mnist", "cifar10", "shapes"]


def _search_dirs(name: str, data_dir: str | None, subfolders: list[str], system: list[str]) -> list[Path]:
    dirs = []
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        dirs += [root] + [root / s for s in subfolders]
    return dirs + [Path(s) for s in system] + [cache_dir() / name]


def _not_found(name: str, split: str, dirs: list[Path], hint: str, reason: str = "") -> DifflabError:
    """``reason``: why the download failed (empty when none was allowed)."""
    looked = ", ".join(str(d) for d in dirs)
    fetch = ("or try the download again" if reason else
             f"or allow download (difflab fetches the files into {cache_dir() / name} and checks their MD5)")
    return DifflabError(f"{name} ({split}) not found{reason} (looked in {looked}); {hint}, {fetch}")


def _load_digits(split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """UCI Optical Recognition of Handwritten Digits (Alpaydin & Kaynak 1998, CC BY 4.0), the 8x8 version
    bundled with scikit-learn as ``load_digits``: 1797 images, values 0..16, scaled here to 0..255 by
    ``round(v * 255 / 16)``. There is no official split: ``split="train"`` is all of it, ``"test"`` raises."""
    if split != "train":
        raise DifflabError("digits has no test split (all 1797 images are split='train'); use split='train'")
    raw = (resources.files("difflab") / "assets" / "digits.npz").read_bytes()
    with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
        values, labels = npz["images"], npz["labels"]
    scale = np.round(np.arange(17) * 255 / 16).astype(np.uint8)  # lookup table 0..16 -> 0..255
    return scale[values][:, None], labels.astype(np.int64), [str(d) for d in range(10)]


def _find_idx(folder: Path, stem: str) -> Path | None:
    """``train-images-idx3-ubyte`` as .gz or raw; some copies write ``train-images.idx3-ubyte``."""
    for base in (stem, stem.replace("-idx", ".idx")):
        for name in (base + ".gz", base):
            if (folder / name).is_file():
                return folder / name
    return None


def _load_idx_dataset(name: str, split: str, data_dir: str | None, download: bool, progress: bool):
    spec = IDX_DATASETS[name]
    dirs = _search_dirs(name, data_dir, spec["subfolders"], spec["system"])
    paths = None
    for d in dirs:
        found = [_find_idx(d, stem) for stem in IDX_STEMS[split]]
        if all(found):
            paths = found
            break
    if paths is None:
        if not download:
            raise _not_found(name, split, dirs, spec["hint"])
        try:
            paths = []
            for stem in IDX_STEMS[split]:
                dest = cache_dir() / name / (stem + ".gz")
                if not dest.is_file():  # one of the pair may be cached already
                    download_first([m + dest.name for m in spec["mirrors"]], dest, md5=spec["md5"][dest.name],
                                   progress=progress)
                paths.append(dest)
        except DifflabError as e:
            raise _not_found(name, split, dirs, spec["hint"], reason=f" and {e}") from None
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or images.dtype != np.uint8 or labels.shape != images.shape[:1] or (labels > 9).any():
        raise DifflabError(f"{paths[0]} and {paths[1]} are not a matching pair of {name} image and label "
                           f"files (shapes {images.shape}, {labels.shape}); fetch them again")
    return images[:, None], labels.astype(np.int64), list(spec["classes"])


def _find_cifar(base: Path) -> Path | None:
    if base.is_file():
        return base  # the archive itself, whatever its name
    for folder in (base, base / CIFAR_FOLDER):
        if (folder / CIFAR_META).is_file():
            return folder
    return base / CIFAR_ARCHIVE if (base / CIFAR_ARCHIVE).is_file() else None


def _load_cifar10(split: str, data_dir: str | None, download: bool, progress: bool):
    dirs = _search_dirs("cifar10", data_dir, CIFAR_SUBFOLDERS, [])
    source = next((s for s in map(_find_cifar, dirs) if s is not None), None)
    hint = f"pass data_dir=<{CIFAR_ARCHIVE} or its extracted {CIFAR_FOLDER} folder>"
    if source is None:
        if not download:
            raise _not_found("cifar10", split, dirs, hint)
        try:
            source = download_file(CIFAR_URL, cache_dir() / "cifar10" / CIFAR_ARCHIVE, md5=CIFAR_MD5,
                                   progress=progress)
        except DifflabError as e:
            raise _not_found("cifar10", split, dirs, hint, reason=f" and {e}") from None
    return read_cifar10(source, split)


def load_dataset(name_or_path: str, *, image_size: int | None = None, channels: int | None = None,
                 data_dir: str | None = None, split: str = "train", download: bool = True,
                 progress: bool = True, captions: bool | None = None) -> ImageData:
    """Load a named dataset (:func:`dataset_names`) or a folder of images into memory.

    Args:
        name_or_path: ``"digits"``, ``"fashion-mnist"``, ``"mnist"``, ``"cifar10"`` (case and ``_`` / ``-``
            do not matter), or a folder. Names win over a folder of the same name: write ``./digits``.
        image_size: side of the square output; None keeps a named dataset's native size; for a folder it
            means the one square size all its images share, or 64 when they differ or are not square.
        channels: 1 (grayscale) or 3 (RGB); None keeps a named dataset's own, and means 3 for folders.
        data_dir: where to look first for a named dataset's files (see the module docstring).
        split: ``"train"`` or ``"test"`` (named datasets; digits only has ``"train"``; ignored for folders).
        download: fetch missing files of Fashion-MNIST, MNIST or CIFAR-10 into the cache.
        progress: show tqdm progress bars for downloads and folder decoding.
        captions: for a folder: True = its captions are required (a caption mistake is an error), None = read
            them when present (a mistake warns and they are left out), False = ignore them.

    A folder is searched recursively for .png, .jpg, .jpeg and .webp files (hidden ones skipped). When it
    holds at least two subfolders and every image lies inside one, the subfolders are the classes.
    Files that fail to decode are left out, counted in ``ImageData.skipped`` and named in one warning.
    A folder with a ``metadata.jsonl`` or a ``.txt`` beside its images is captioned (``ImageData.captions``, see
    :mod:`difflab.data.captions`); ``"shapes"`` is the procedural captioned dataset of :mod:`difflab.data.shapes`.
    """
    if split not in SPLITS:
        raise DifflabError(f"unknown split {split!r}; use 'train' or 'test'")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral)
                                   or image_size < 1):
        raise DifflabError(f"image_size must be a positive integer, got {image_size!r}")
    image_size = None if image_size is None else int(image_size)
    if channels not in (None, 1, 3):
        raise DifflabError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")

    key = str(name_or_path).strip().lower().replace("_", "-")
    key = {"cifar-10": "cifar10", "fashionmnist": "fashion-mnist"}.get(key, key)
    if key in dataset_names():
        if key == "shapes":  # procedural, captioned (difflab.data.shapes)
            from difflab.data.shapes import load_shapes

            return load_shapes(split=split, image_size=image_size or 32, channels=channels or 3)
        if key == "digits":
            images, labels, class_names = _load_digits(split)
        elif key == "cifar10":
            images, labels, class_names = _load_cifar10(split, data_dir, download, progress)
        else:
            images, labels, class_names = _load_idx_dataset(key, split, data_dir, download, progress)
        images = fit_array(images, image_size, channels or images.shape[1])
        return ImageData(torch.from_numpy(images), torch.from_numpy(labels), class_names, key)

    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        images, labels, class_names, skipped, captions = load_image_folder(
            folder, image_size=image_size, channels=channels or 3, progress=progress, captions=captions)
        return ImageData(torch.from_numpy(images), None if labels is None else torch.from_numpy(labels),
                         class_names, f"folder:{folder.resolve()}", skipped, captions)
    known = ", ".join(dataset_names())
    if folder.exists():
        raise DifflabError(f"'{name_or_path}' is a file, not a folder of images; pass a folder or a dataset "
                           f"name ({known}); a CIFAR-10 archive goes in data_dir with the name cifar10")
    raise DifflabError(f"unknown dataset or missing folder '{name_or_path}' (known datasets: {known})")
