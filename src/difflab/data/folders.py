"""Images as pixels: decoding files, converting between grayscale and RGB, resizing to a square, and
loading a whole folder of images (with its class subfolders and captions, :mod:`difflab.data.captions`).

Every image, whether decoded from a file or taken from an in-memory dataset, goes through the same
:func:`fit_image`: convert to ``L`` (1 channel) or ``RGB`` (3 channels), then take the largest centred
square and resample it to ``size x size`` with Pillow's antialiased bicubic filter. This is the same as
resizing the shorter side to ``size`` and center-cropping, in one resampling step.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from difflab.data.captions import read_folder_captions
from difflab.errors import DifflabError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
MAX_WORKERS = 16  # decoding threads; Pillow releases the GIL while it decodes and resamples
SHOW_SKIPPED = 3  # file names listed in the warning about undecodable files
DEFAULT_SIZE = 64  # folder images of mixed or non-square sizes, when no image_size is given


def fit_image(img: Image.Image, size: int | None, channels: int) -> np.ndarray:
    """Convert ``img`` to ``channels`` (1: L, 3: RGB) and, unless ``size`` is None, resize and
    center-crop it to ``size x size``. Returns uint8 (H, W, C).

    Transparent pixels are composited onto white; 16-bit grayscale is scaled to 8 bits.
    """
    if img.mode.startswith("I"):  # 16-bit PNGs ("I;16") or 32-bit integer images: scale to 0..255
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        background.alpha_composite(img.convert("RGBA"))
        img = background
    img = img.convert("L" if channels == 1 else "RGB")
    if size is not None and img.size != (size, size):
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        img = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    pixels = np.asarray(img, dtype=np.uint8)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def fit_array(images: np.ndarray, size: int | None, channels: int) -> np.ndarray:
    """:func:`fit_image` applied to each image of a uint8 (N, C, H, W) array; returns (N, C', H', W')."""
    n, c, h, w = images.shape
    if channels == c and (size is None or size == h == w):
        return images
    if size is None or size == h == w:
        if (c, channels) == (1, 3):  # grayscale to RGB is exact: repeat the plane
            return np.repeat(images, 3, axis=1)
    hwc = images.transpose(0, 2, 3, 1)  # Pillow reads (H, W) uint8 as L and (H, W, 3) as RGB
    out = [fit_image(Image.fromarray(np.ascontiguousarray(im[:, :, 0] if c == 1 else im)), size, channels)
           for im in hwc]
    return stack_chw(out)


def stack_chw(images: list[np.ndarray]) -> np.ndarray:
    """A list of (H, W, C) uint8 arrays -> one contiguous (N, C, H, W) array."""
    return np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2))


def decode_image(path: Path, size: int | None, channels: int) -> np.ndarray | Exception:
    """Decode one file (EXIF orientation applied) through :func:`fit_image`; a failure is returned,
    not raised, so that a pool of workers can count and report it."""
    try:
        with Image.open(path) as img:
            if size is not None and img.format == "JPEG":
                img.draft(None, (size, size))  # let libjpeg decode at 1/2, 1/4, 1/8 scale when that suffices
            return fit_image(ImageOps.exif_transpose(img), size, channels)
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return e


def find_images(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, in sorted order; hidden files and folders are skipped."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root, f) for f in files if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def _header_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as img:
            return img.size
    except Exception:
        return None  # reported later, when decoding fails


def default_size(files: list[Path], pool: ThreadPoolExecutor) -> int:
    """The size a folder loads at when no image_size is given: the one square size all its images share
    (read from the file headers), else :data:`DEFAULT_SIZE`."""
    sizes = {s for s in pool.map(_header_size, files) if s is not None}
    if len(sizes) == 1 and (only := sizes.pop())[0] == only[1]:
        return only[0]
    return DEFAULT_SIZE


def load_image_folder(folder: Path, *, image_size: int | None, channels: int, progress: bool,
                      captions: bool | None = None
                      ) -> tuple[np.ndarray, np.ndarray | None, list[str] | None, int, list[list[str]] | None]:
    """Decode every image under ``folder``. Returns images uint8 (N, C, H, W), labels int64 (N,) or
    None, class names or None, how many files were skipped because they could not be decoded, and each
    loaded image's captions or None (see :mod:`difflab.data.captions`).

    Labels come from the first level of subfolders when there are at least two of them and every image
    lies inside one; class ``i`` is the ``i``-th subfolder name in sorted order. Captions are read before
    any image is decoded, so a caption mistake shows at once; those of undecodable images are dropped.
    ``captions``: True = a caption mistake is an error (a text-to-image run needs them); None = read them when
    present, but a mistake only warns and the folder loads without captions; False = do not read them.
    """
    files = find_images(folder)
    if not files:
        raise DifflabError(f"no images in '{folder}' (searched it and its subfolders for "
                           f"{', '.join(IMAGE_EXTENSIONS)} files); point it at a folder of images")
    relative = [f.relative_to(folder) for f in files]
    subfolders = sorted({r.parts[0] for r in relative if len(r.parts) > 1})
    class_names = subfolders if len(subfolders) >= 2 and all(len(r.parts) > 1 for r in relative) else None
    wanted, captions = captions, None
    if wanted is not False:
        try:
            captions = read_folder_captions(folder, files)
        except DifflabError as e:
            if wanted:
                raise
            warnings.warn(f"{e} -- loading the images without captions", stacklevel=3)

    with ThreadPoolExecutor(max_workers=min(MAX_WORKERS, os.cpu_count() or 1)) as pool:
        size = image_size if image_size is not None else default_size(files, pool)
        decoded = list(tqdm(pool.map(lambda f: decode_image(f, size, channels), files), total=len(files),
                            desc=f"decoding {folder.name or folder}", unit="img", disable=not progress))

    bad = [(r, d) for r, d in zip(relative, decoded) if isinstance(d, Exception)]
    if len(bad) == len(files):
        raise DifflabError(f"none of the {len(files)} image files in '{folder}' could be decoded (first: "
                           f"{bad[0][0]}: {type(bad[0][1]).__name__}); check they are valid PNG, JPEG or WebP")
    if bad:
        names = ", ".join(str(r) for r, _ in bad[:SHOW_SKIPPED]) + (", ..." if len(bad) > SHOW_SKIPPED else "")
        warnings.warn(f"skipped {len(bad)} of {len(files)} image files in '{folder}' that could not be "
                      f"decoded: {names}", stacklevel=3)
    good = [i for i, d in enumerate(decoded) if not isinstance(d, Exception)]
    images = stack_chw([decoded[i] for i in good])
    labels = None
    if class_names is not None:
        index = {name: i for i, name in enumerate(class_names)}
        labels = np.array([index[relative[i].parts[0]] for i in good], dtype=np.int64)
    if captions is not None:
        captions = [captions[i] for i in good]
    return images, labels, class_names, len(bad), captions
