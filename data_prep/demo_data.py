"""A small real class-conditional image set that needs no download: scikit-learn's digits.

`sklearn.datasets.load_digits` ships 1,797 real 8x8 scans of handwritten digits (10 classes,
intensities 0..16) inside the package. They are written as an ImageFolder (`<out>/<digit>/*.png`,
class folders "0".."9"), upscaled with a bicubic filter and a light blur so strokes look drawn
rather than blocky, dark ink on white, grayscale stored as RGB.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from tqdm import tqdm

DIGIT_MAX_INTENSITY = 16.0


@dataclass
class DemoDataSummary:
    out: Path
    num_images: int
    num_classes: int
    resolution: int


def digit_to_image(digit: np.ndarray, resolution: int) -> Image.Image:
    """One 8x8 scan (0..16, ink high) -> RGB image of side `resolution`, dark ink on white."""
    ink = np.clip(digit.astype(np.float32) / DIGIT_MAX_INTENSITY, 0.0, 1.0)
    small = Image.fromarray(np.round(255.0 * (1.0 - ink)).astype(np.uint8), mode="L")
    # Pad by one white pixel so the bicubic kernel sees background at the borders, then crop back.
    padded = Image.new("L", (10, 10), 255)
    padded.paste(small, (1, 1))
    scale = resolution / 8.0
    big = padded.resize((round(10 * scale), round(10 * scale)), Image.Resampling.BICUBIC)
    big = big.filter(ImageFilter.GaussianBlur(radius=scale * 0.25))
    offset = round(scale)
    big = big.crop((offset, offset, offset + resolution, offset + resolution))
    return big.convert("RGB")


def write_demo_data(out: str | Path, resolution: int = 64, limit: int | None = None,
                    progress: bool = True) -> DemoDataSummary:
    """Write the digits (all 1,797, or the first `limit`) as PNGs; an existing file is overwritten."""
    from sklearn.datasets import load_digits

    if resolution < 8:
        raise ValueError(f"resolution must be at least 8 (the scans are 8x8), got {resolution}")
    digits = load_digits()
    images, labels = digits.images, digits.target
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    out = Path(out)
    for label in sorted(set(int(l) for l in labels)):
        (out / str(label)).mkdir(parents=True, exist_ok=True)
    for index, (digit, label) in enumerate(tqdm(list(zip(images, labels)), desc="demo-data", unit="img",
                                                disable=not progress)):
        digit_to_image(digit, resolution).save(out / str(int(label)) / f"{index:04d}.png")
    return DemoDataSummary(out=out, num_images=len(labels), num_classes=len(set(labels.tolist())),
                           resolution=resolution)
