"""Image files: which files are images, listing them, reading them as RGB, writing PNGs atomically.

The one extension list of the project (extraction, reference statistics, the classifier's
ImageFolder and the tokenizer's data all go by it): what Pillow decodes out of the box, matched
case-insensitively. Everything that reads an image file for its pixels reads it through
`read_image_rgb`, so grayscale, palette, alpha and CMYK files become RGB the same way everywhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from var_train.errors import MissingInputError
from var_train.fileio import atomic_write

# The reference's preprocessing resizes the shorter side to round(RESIZE_RATIO x R) before the
# R x R crop (centred at extraction and evaluation, random in tokenizer training).
RESIZE_RATIO = 1.125
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def is_image_file(name: str | Path) -> bool:
    return str(name).lower().endswith(IMAGE_EXTENSIONS)


def class_folders(root: str | Path) -> list[Path]:
    """The class folders of an ImageFolder `root` (one per class, sorted by name -> class ids 0..C-1,
    as torchvision's ImageFolder; hidden folders skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise MissingInputError(f"image folder not found: {root}")
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise MissingInputError(f"{root} has no class subfolders (an ImageFolder has one folder per class)")
    return folders


def list_image_files(folder: str | Path) -> list[Path]:
    """Every image file below `folder` (recursively), sorted; an error names the folder if none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p.name))
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return files


def read_image_rgb(path: str | Path) -> Image.Image:
    """The image at `path` as an RGB Pillow image, fully loaded (the file is closed on return)."""
    with Image.open(path) as image:
        return image.convert("RGB")


def read_image_array(path: str | Path) -> np.ndarray:
    """The image at `path` as uint8 (H, W, 3)."""
    return np.asarray(read_image_rgb(path))


def write_png_atomic(image_hwc: np.ndarray, path: str | Path) -> Path:
    """uint8 (H, W, 3) -> a PNG at `path`, written under a temporary name and renamed.

    Not fsynced: an evaluation writes tens of thousands of them, and a killed process (the case
    resumption guards against) never leaves a half-written one behind either way."""
    with atomic_write(path, fsync=False) as tmp:
        Image.fromarray(image_hwc).save(tmp, format="PNG")
    return Path(path)
