"""Images for tokenizer training: an ImageFolder, a held-out split and a resumable batch order.

Every rank draws the same per-epoch permutation (seeded by seed + epoch) and takes its own
interleaved slice, so a run restarted at step s continues with exactly the batches it would have
seen, without reading the skipped images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms
from torchvision.datasets import ImageFolder


def _to_rgb(image):
    return image.convert("RGB")  # drops alpha without compositing, as the reference does


def _to_signed_unit(x: torch.Tensor) -> torch.Tensor:
    return x * 2 - 1


def image_transform(resolution: int, train: bool, hflip: bool = False) -> transforms.Compose:
    """The reference preprocessing: shorter side to round(1.125 R) (LANCZOS), an R x R crop
    (random in training, centred otherwise), optional horizontal flip, values in [-1, 1]."""
    steps = [transforms.Lambda(_to_rgb),
             transforms.Resize(round(1.125 * resolution), interpolation=transforms.InterpolationMode.LANCZOS),
             transforms.RandomCrop(resolution) if train else transforms.CenterCrop(resolution)]
    if train and hflip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Lambda(_to_signed_unit)]
    return transforms.Compose(steps)


def split_image_folder(root: str | Path, resolution: int, val_fraction: float, seed: int,
                       hflip: bool = False, val_max_images: int | None = None) -> tuple[Dataset, Dataset | None]:
    """-> (train, held-out) subsets of the ImageFolder at `root`; the split depends only on `seed`."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root} (expected <root>/<class>/<image> files)")
    train_set = ImageFolder(str(root), transform=image_transform(resolution, train=True, hflip=hflip))
    val_set = ImageFolder(str(root), transform=image_transform(resolution, train=False))
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed)).tolist()
    num_val = int(round(val_fraction * len(order)))
    if val_max_images is not None:
        num_val = min(num_val, val_max_images)
    held_out = Subset(val_set, sorted(order[:num_val])) if num_val else None
    return Subset(train_set, sorted(order[num_val:])), held_out


class EpochBatchSampler:
    """Batches of indices for one rank: a seeded permutation per epoch, the tail that would make
    ranks unequal dropped, and a start offset (in batches) for resuming inside an epoch."""

    def __init__(self, dataset_size: int, batch_size: int, rank: int, world_size: int, seed: int):
        self.dataset_size, self.batch_size = dataset_size, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.batches_per_epoch = dataset_size // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{dataset_size} training images are fewer than one global batch "
                             f"({batch_size} per rank x {world_size} ranks)")
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, start_batch: int) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.dataset_size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        mine = order[: self.batches_per_epoch * self.batch_size * self.world_size][self.rank:: self.world_size]
        for b in range(self.start_batch, self.batches_per_epoch):
            yield mine[b * self.batch_size: (b + 1) * self.batch_size].tolist()


def batches_from(dataset: Dataset, sampler: EpochBatchSampler, start_step: int, num_workers: int,
                 pin_memory: bool = False) -> Iterator[torch.Tensor]:
    """Endless image batches starting at global step `start_step` (epochs roll over)."""
    step = start_step
    while True:
        epoch, position = divmod(step, sampler.batches_per_epoch)
        sampler.set_position(epoch, position)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory)
        for images, _ in loader:
            yield images
            step += 1
