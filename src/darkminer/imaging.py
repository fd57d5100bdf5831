"""Image grids and PNG output."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from darkminer.io import atomic_path


def to_pil(image: torch.Tensor) -> Image.Image:
    """One image (3, H, W) in [0, 1] to PIL."""
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def make_grid(images: torch.Tensor, ncols: int | None = None, pad: int = 2, scale: int = 1) -> Image.Image:
    """Images (B, 3, H, W) in [0, 1] laid out in a grid with white gutters; ``scale`` enlarges small images."""
    n, _, h, w = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    canvas = Image.new("RGB", (ncols * (w * scale + pad) + pad, nrows * (h * scale + pad) + pad), "white")
    for i in range(n):
        tile = to_pil(images[i])
        if scale != 1:
            tile = tile.resize((w * scale, h * scale), Image.NEAREST)
        r, c = divmod(i, ncols)
        canvas.paste(tile, (pad + c * (w * scale + pad), pad + r * (h * scale + pad)))
    return canvas


def save_png(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path
