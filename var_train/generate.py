"""Generate class-conditional images from a VAR and a VQVAE, in batches, and write them as PNGs."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from var_train.models import VAR, VQVAE, sample_tokens


def parse_classes(text: str | None, num_classes: int) -> list[int]:
    """'0,3,7' or '0-9' or a mix ('1,4-6'); None or '' means every class."""
    if not text:
        return list(range(num_classes))
    classes = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            low, high = (int(x) for x in part.split("-", 1))
            classes.extend(range(low, high + 1))
        elif part:
            classes.append(int(part))
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"class ids {bad} are outside 0..{num_classes - 1}")
    return classes


def autocast_for(device: torch.device, precision: str):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    return contextlib.nullcontext()


@torch.no_grad()
def generate_images(var: VAR, vae: VQVAE, labels: torch.Tensor, *, cfg: float = 1.5, top_k: int = 0,
                    top_p: float = 0.0, seed: int = 0, batch_size: int = 32, precision: str = "auto",
                    progress: bool = True) -> torch.Tensor:
    """labels (N,) -> uint8 images (N, 3, H, W) on the CPU. Batch b draws from a generator seeded
    with seed + b, so a run is reproducible for a given batch size."""
    device = next(var.parameters()).device
    images = []
    batches = range(0, len(labels), batch_size)
    bar = tqdm(total=len(labels), unit="img", desc="sampling", disable=not progress)
    for batch_index, start in enumerate(batches):
        batch_labels = labels[start:start + batch_size].to(device)
        generator = torch.Generator(device=device).manual_seed(seed + batch_index)
        with autocast_for(device, precision):
            tokens = sample_tokens(var, vae.quantize, batch_labels, cfg=cfg, top_k=top_k, top_p=top_p,
                                   generator=generator)
        images.append(vae.tokens_to_uint8_image(tokens).cpu())
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
        save_image(image.float() / 255, out_dir / f"{label:04d}_{index:04d}.png")
    cells = images.float() / 255
    if display_size and cells.shape[-1] < display_size:
        cells = torch.nn.functional.interpolate(cells, size=(display_size, display_size), mode="nearest")
    grid = make_grid(cells, nrow=per_row or max(1, min(16, len(images))), padding=2)
    grid_path = out_dir / "grid.png"
    save_image(grid, grid_path)
    return grid_path
