"""Image decoding and the reference's evaluation transform, with every failure turned into a reason.

Reference transform (see REFERENCE.md): PIL `.convert('RGB')` (alpha dropped, not composited;
palette, grayscale and CMYK converted by PIL), torchvision `Resize(round(1.125 * R), LANCZOS)`
of the shorter side, a centre crop to R x R (`top = round((h - R) / 2)`), `ToTensor()`, and
x * 2 - 1 into [-1, 1]. With `crops > 1` the crops are random (as the reference's training
transform), their positions drawn from a generator seeded by (seed, record key).
"""

from __future__ import annotations

import io
import warnings
import zlib

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from var_train.data.images import RESIZE_RATIO


class BadImage(Exception):
    """An input that cannot become a training image; the message is the reason for the report."""


def decode_image(data: bytes, min_size: int = 0) -> tuple[Image.Image, str]:
    """Encoded bytes -> (RGB PIL image, the file's original mode). Raises BadImage with a reason."""
    if not data:
        raise BadImage("zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette-with-transparency and EXIF chatter
            image = Image.open(io.BytesIO(data))
            image.load()
            mode = image.mode
            width, height = image.size
            if width == 0 or height == 0:
                raise BadImage(f"zero-size image ({width}x{height})")
            if min(width, height) < min_size:
                raise BadImage(f"too small: {width}x{height}, shorter side < --min-size {min_size}")
            return image.convert("RGB"), mode
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not a readable image (unknown or corrupt format)") from None
    except Image.DecompressionBombError as e:
        raise BadImage(f"too many pixels: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL's truncated/corrupt data errors
        raise BadImage(f"corrupt or truncated image data: {e}") from None


class ReferenceTransform:
    """RGB PIL image -> (num_crops, 3, R, R) float32 in [-1, 1]."""

    def __init__(self, resolution: int, crops: int = 1, seed: int = 0):
        if crops < 1:
            raise ValueError(f"crops must be >= 1, got {crops}")
        self.resolution, self.crops, self.seed = resolution, crops, seed
        self.resize_to = round(RESIZE_RATIO * resolution)

    def describe(self) -> dict:
        return {"convert": "PIL convert('RGB')", "resize_shorter_side": self.resize_to, "interpolation": "lanczos",
                "crop": "center" if self.crops == 1 else f"{self.crops} random crops (seeded by seed and key)",
                "crop_size": self.resolution, "value_range": [-1, 1], "seed": self.seed}

    def crop_boxes(self, height: int, width: int, key: str) -> list[tuple[int, int]]:
        """(top, left) of each crop of a resized image of size (height, width)."""
        size = self.resolution
        if self.crops == 1:
            return [(int(round((height - size) / 2.0)), int(round((width - size) / 2.0)))]
        rng = np.random.default_rng([self.seed, zlib.crc32(key.encode())])
        return [(int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1)))
                for _ in range(self.crops)]

    def __call__(self, image: Image.Image, key: str = "") -> torch.Tensor:
        resized = TF.resize(image, self.resize_to, interpolation=InterpolationMode.LANCZOS)
        width, height = resized.size
        crops = [TF.to_tensor(TF.crop(resized, top, left, self.resolution, self.resolution))
                 for top, left in self.crop_boxes(height, width, key)]
        return torch.stack(crops).mul_(2).sub_(1)
