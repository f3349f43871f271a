"""Pictures people would rather look at than read: sample grids and the loss curve."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from difflab.data import from_model_range


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images in [-1, 1] (N, C, H, W) -> PIL images (mode L for 1 channel, RGB for 3)."""
    arr = from_model_range(images.detach().cpu()).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2, min_cell: int = 64,
              captions: list[str] | None = None) -> Image.Image:
    """Tile images in [-1, 1] into one picture; tiny images (e.g. 8x8 digits) are enlarged (nearest
    neighbour) so each cell is at least ``min_cell`` pixels wide. ``captions`` (one per image, e.g. the prompts of
    a text-to-image grid) are written under the cells, wrapped to the cell width."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    scale = max(1, math.ceil((min_cell if captions is None else max(min_cell, 96)) / max(h, w)))
    cells = from_model_range(images.detach().cpu()).permute(0, 2, 3, 1).numpy()
    cells = cells.repeat(scale, axis=1).repeat(scale, axis=2)
    H, W = h * scale, w * scale
    font, lines, band = None, [], 0
    if captions is not None:
        font = ImageFont.load_default()
        lines = [_wrap(_drawable(str(t), font), font, W) for t in captions]
        band = 2 + _line_height(font) * max((len(x) for x in lines), default=0)
    grid = np.full((ncol * (H + band + pad) + pad, nrow * (W + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        top, left = pad + r * (H + band + pad), pad + q * (W + pad)
        grid[top: top + H, left: left + W] = cells[i]
    picture = Image.fromarray(grid[..., 0] if c == 1 else grid)
    if captions is not None:
        draw = ImageDraw.Draw(picture)
        for i, text in enumerate(lines):
            r, q = divmod(i, nrow)
            top, left = pad + r * (H + band + pad) + H + 1, pad + q * (W + pad)
            for k, line in enumerate(text):
                draw.text((left, top + k * _line_height(font)), line, fill=0, font=font)
    return picture


def _drawable(text: str, font) -> str:
    """``text``, or its Latin-1 approximation where the font cannot draw it (Pillow's bitmap fallback font, used
    without FreeType, knows only Latin-1)."""
    try:
        font.getlength(text)
        return text
    except UnicodeError:
        return text.encode("latin-1", "replace").decode("latin-1")


def _line_height(font) -> int:
    box = font.getbbox("Ag")
    return box[3] - box[1] + 3


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap of ``text`` to lines no wider than ``width`` pixels (a too-long word is cut)."""
    lines, line = [], ""
    for word in text.split() or [""]:
        trial = f"{line} {word}".strip()
        if font.getlength(trial) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
        while font.getlength(line) > width and len(line) > 1:  # a single word wider than the cell
            line = line[:-1]
    lines.append(line)
    return lines


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None,
              captions: list[str] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, nrow, captions=captions).save(path)
    return path


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported when a plot is drawn: it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_log(log_path: str | Path) -> list[dict]:
    """The rows of a JSONL training log (none when there is no file yet); a line cut short (a crash, a full disk) is
    left out."""
    if not Path(log_path).is_file():
        return []
    rows = []
    for line in Path(log_path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_loss(log_path: str | Path, out_path: str | Path) -> Path | None:
    """Draw ``loss.png`` from the JSONL training log (raw and smoothed loss, log scale)."""
    plt = _pyplot()
    if not Path(log_path).is_file():  # nothing logged yet
        return None
    all_rows = read_log(log_path)
    rows = [r for r in all_rows if r.get("loss") is not None]  # None: every step of that interval was skipped
    evals = [r for r in all_rows if any(k.startswith("eval_") for k in r)]
    if not rows:
        return None
    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, loss, lw=0.8, alpha=0.5, label="loss")
    if len(loss) >= 5:
        k = max(2, len(loss) // 20)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=1.5, label=f"moving average ({k})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    logged = [k for k in (evals[0] if evals else {}) if k.startswith("eval_") and all(k in r for r in evals)]
    keys = [k for k in ("eval_fid", "eval_kid_mean", "eval_precision", "eval_is_mean") if k in logged] + logged
    if keys:  # the first sample-quality metric logged during training, on a second axis
        key = keys[0]
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [r[key] for r in evals], "o-", color="tab:red", label=key[5:])
        ax2.set_ylabel(key[5:], color="tab:red")
        ax2.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return Path(out_path)


def plot_accuracy(rows: list[dict], chance: float, path: str | Path) -> Path:
    """Draw a noise-aware classifier's held-out accuracy against the timestep (rows of t and accuracy)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot([r["t"] for r in rows], [r["accuracy"] for r in rows], "o-", label="held-out accuracy")
    ax.axhline(chance, color="gray", ls="--", lw=1, label="chance")
    ax.set(xlabel="timestep t (noise grows to the right)", ylabel="accuracy", ylim=(0, 1.02),
           title="noise-aware classifier")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
