"""Image grids and PNG output."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from darkminer.io import atomic_path

MARK_COLOUR = (220, 30, 30)  # the frame of a marked tile: an image the detector saw the concept in


def to_pil(image: torch.Tensor) -> Image.Image:
    """One image (3, H, W) in [0, 1] to PIL."""
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def make_grid(images: torch.Tensor, ncols: int | None = None, pad: int = 2, scale: int = 1,
              marked: Sequence[bool] | None = None) -> Image.Image:
    """Images (B, 3, H, W) in [0, 1] laid out in a grid with white gutters; ``scale`` enlarges small images.
    Each image ``marked`` True gets a red frame, half a gutter wide, in the gutter around it."""
    n, _, h, w = images.shape
    if marked is not None and len(marked) != n:
        raise ValueError(f"marked has {len(marked)} entries for {n} images")
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    canvas = Image.new("RGB", (ncols * (w * scale + pad) + pad, nrows * (h * scale + pad) + pad), "white")
    frame = max(1, pad // 2)
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        tile = to_pil(images[i])
        if scale != 1:
            tile = tile.resize((w * scale, h * scale), Image.NEAREST)
        r, c = divmod(i, ncols)
        left, top = pad + c * (w * scale + pad), pad + r * (h * scale + pad)
        if marked is not None and marked[i]:
            draw.rectangle((left - frame, top - frame, left + w * scale + frame - 1, top + h * scale + frame - 1),
                           fill=MARK_COLOUR)
        canvas.paste(tile, (left, top))
    return canvas


def save_png(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path
