"""Generate class-conditional images from a VAR and a VQVAE, in batches, and write them as PNGs.

The sampling itself is `var_train.models.generate_batch` (the one generation path, shared with
evaluation); this module only batches a label list and writes the results.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from var_train.data.images import write_png_atomic
from var_train.errors import ConfigError
from var_train.fileio import atomic_write
from var_train.models import VAR, VQVAE, SamplingSettings, generate_batch


def parse_classes(text: str | None, num_classes: int) -> list[int]:
    """'0,3,7' or '0-9' or a mix ('1,4-6'); None or '' means every class."""
    if not text:
        return list(range(num_classes))
    classes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            low, high = (int(x) for x in part.split("-", 1)) if "-" in part else (int(part),) * 2
        except ValueError:
            raise ConfigError(f"--classes {text!r}: expected class ids such as '0,3,7', '0-9' or 'null'") from None
        if high < low:
            raise ConfigError(f"--classes {text!r}: the range {part} is empty; write it low-high")
        classes.extend(range(low, high + 1))
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ConfigError(f"class ids {bad} are outside 0..{num_classes - 1} (the model has {num_classes} classes)")
    return classes


@torch.no_grad()
def generate_images(var: VAR, vae: VQVAE, labels: torch.Tensor, settings: SamplingSettings = SamplingSettings(), *,
                    batch_size: int = 32, progress: bool = True) -> torch.Tensor:
    """labels (N,) -> uint8 images (N, 3, H, W) on the CPU. Image i is sample i of the run (its
    seed follows from settings.seed and i), so the result does not depend on `batch_size`."""
    device = next(var.parameters()).device
    images = []
    bar = tqdm(total=len(labels), unit="img", desc="sampling", disable=not progress)
    for start in range(0, len(labels), batch_size):
        batch_labels = labels[start:start + batch_size].to(device)
        indices = range(start, start + len(batch_labels))
        images.append(generate_batch(var, vae, batch_labels, indices, settings).cpu())
        bar.update(len(batch_labels))
    bar.close()
    return torch.cat(images) if images else torch.empty(0, 3, vae.resolution, vae.resolution, dtype=torch.uint8)


def write_samples(images: torch.Tensor, labels: torch.Tensor, out_dir: str | Path, per_row: int | None = None,
                  display_size: int | None = None) -> Path:
    """Write `<out>/<class>_<index>.png` for each image and `<out>/grid.png` (cells enlarged to
    `display_size` pixels when the images are smaller); return the grid path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seen: dict[int, int] = {}
    for image, label in zip(images, labels.tolist()):
        index = seen.get(label, 0)
        seen[label] = index + 1
        write_png_atomic(image.permute(1, 2, 0).numpy(), out_dir / f"{label:04d}_{index:04d}.png")
    cells = images.float() / 255
    if display_size and cells.shape[-1] < display_size:
        cells = torch.nn.functional.interpolate(cells, size=(display_size, display_size), mode="nearest")
    grid = make_grid(cells, nrow=per_row or max(1, min(16, len(images))), padding=2)
    grid_path = out_dir / "grid.png"
    with atomic_write(grid_path, fsync=False) as tmp:
        save_image(grid, tmp)
    return grid_path
