"""A sample grid with each tile's caption (its class) written above it, as one PIL image."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .features import to_uint8_images

CAPTION_HEIGHT = 12
PADDING = 2


def labelled_grid(images: torch.Tensor, captions: list[str], per_row: int | None = None,
                  background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """uint8 or [0, 1] float images (N, 3, H, W) and N captions -> RGB grid (tiles left to right,
    top to bottom). Captions longer than the tile are cut."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if len(images) == 0:
        raise ValueError("no images for the grid")
    pixels = to_uint8_images(images.cpu()).permute(0, 2, 3, 1).numpy()
    count, height, width = pixels.shape[:3]
    per_row = per_row or min(count, max(1, math.ceil(math.sqrt(count))))
    rows = math.ceil(count / per_row)
    cell_w, cell_h = width + PADDING, height + CAPTION_HEIGHT + PADDING
    canvas = Image.new("RGB", (per_row * cell_w + PADDING, rows * cell_h + PADDING), background)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    max_chars = max(1, width // 6)
    for i in range(count):
        x = PADDING + (i % per_row) * cell_w
        y = PADDING + (i // per_row) * cell_h
        draw.text((x, y), captions[i][:max_chars], fill=(0, 0, 0), font=font)
        canvas.paste(Image.fromarray(np.ascontiguousarray(pixels[i])), (x, y + CAPTION_HEIGHT))
    return canvas
