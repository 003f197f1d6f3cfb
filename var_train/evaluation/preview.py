"""A cheap look at the model during training: a small captioned sample grid every `eval.grid_every_steps`.

Unlike the scheduled evaluation (FID, IS: a feature extractor, a reference, thousands of samples)
this only samples `eval.grid_samples` images, spread over the classes, and decodes them with the
VQVAE: no Inception file, no reference statistics. The same labels and noise every time, so the
grids of successive steps show the same slots improving. A collective under sharded engines:
every rank samples the same batch (only rank 0 keeps the images).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from PIL import Image

from var_train.errors import ConfigError
from var_train.models import generate_batch
from var_train.parallel.distributed import is_main_process

from .grid import labelled_grid
from .sampling import eval_mode, find_var, sampling_settings


@dataclass
class Preview:
    images: torch.Tensor        # uint8 (N, 3, H, W) on the CPU
    labels: list[int]
    grid: Image.Image | None    # rank 0 only


def spread_labels(count: int, num_classes: int) -> list[int]:
    """`count` class ids spread evenly over [0, num_classes) (every class once when count >= num_classes)."""
    if count >= num_classes:
        return [i % num_classes for i in range(count)]
    return [int(i * num_classes // count) for i in range(count)]


class SampleGrid:
    def __init__(self, eval_cfg, model_cfg, device: torch.device | str, *, vae_path: str | None = None,
                 vae: nn.Module | None = None, class_names: list[str] | None = None):
        from var_train.models.checkpoint_io import load_vae

        self.cfg = eval_cfg
        self.device = torch.device(device)
        if vae is None:
            if not vae_path:
                raise ConfigError("eval.grid_every_steps needs a full VQVAE to decode (eval.vae or data.vae)")
            vae = load_vae(vae_path, patch_nums=list(model_cfg.patch_nums))
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.labels = spread_labels(int(eval_cfg.grid_samples), int(model_cfg.num_classes))
        self.settings = sampling_settings(eval_cfg)
        self.captions = [class_names[label] if class_names and label < len(class_names) else str(label)
                         for label in self.labels]

    def due(self, step: int) -> bool:
        every = int(self.cfg.grid_every_steps or 0)
        return every > 0 and step > 0 and step % every == 0

    @torch.no_grad()
    def generate(self, model: nn.Module, quantizer: nn.Module | None = None) -> Preview:
        """Sample and decode the grid's images (call on every rank: the model may be sharded)."""
        var = find_var(model)
        labels = torch.tensor(self.labels, dtype=torch.long, device=self.device)
        with eval_mode(var):
            # slot j is sample j of the run's seed (the one seeding rule): the same noise every time
            images = generate_batch(var, self.vae, labels, range(len(self.labels)), self.settings, quantizer=quantizer)
        images = images.cpu()
        grid = labelled_grid(images, self.captions, per_row=min(8, len(images))) if is_main_process() else None
        return Preview(images=images, labels=list(self.labels), grid=grid)
