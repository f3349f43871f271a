"""The training images of a task that learns from a dataset: loaded once, whole, onto the device."""

from __future__ import annotations

import dataclasses

from difflab import distributed
from difflab.data import ImageData, load_dataset
from difflab.errors import DifflabError
from difflab.training.config import RunConfig
from difflab.training.runs import default_hflip
from difflab.training.task import Context


def load_training_images(run: RunConfig, ctx: Context, *, captions: bool = False) -> tuple[ImageData, RunConfig]:
    """The dataset of ``run`` as uint8 (N, C, H, W), and ``run`` with the image size, channels and flips it
    resolved to (what the run folder's config.json records). The main process loads (and, if needed,
    downloads) first, so several processes never write the same cache file. ``captions``: a folder's captions are
    needed (a caption mistake is an error) rather than ignored."""

    def load() -> ImageData:
        return load_dataset(run.dataset, image_size=run.image_size, channels=run.channels, data_dir=run.data_dir,
                            progress=ctx.progress, captions=captions)

    data = distributed.main_then_others(load)
    _, channels, height, width = data.images.shape
    if height != width:
        raise DifflabError(f"images must be square for the U-Net, got {height}x{width} (set --image-size)")
    hflip = run.hflip if run.hflip is not None else default_hflip(data.name)
    return data, dataclasses.replace(run, image_size=height, channels=channels, hflip=hflip)
