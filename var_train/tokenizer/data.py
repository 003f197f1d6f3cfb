"""Images for tokenizer training: an ImageFolder, a held-out split and a resumable batch order.

Preprocessing is the reference's (REFERENCE.md): `.convert('RGB')`, shorter side to
round(1.125 R) with LANCZOS, an R x R crop, values in [-1, 1]. Training crops are random (and
optionally flipped), drawn from a generator seeded by (seed, epoch, image), so a step's images do
not depend on the global RNG, the number of loader workers, or whether the run was resumed; the
held-out images are centre-cropped, as at extraction.

Every rank draws the same per-epoch permutation (seeded by seed + epoch) and takes its own
interleaved slice, so a run restarted at step s continues with exactly the batches it would have
seen, without reading the skipped images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.transforms import functional as TF

from var_train.data.loader import ignore_stop_signals, stop_signals_blocked
from var_train.data.images import RESIZE_RATIO, is_image_file, read_image_rgb
from var_train.errors import MissingInputError


class FolderImages(Dataset):
    """Images of an ImageFolder (those at `indices`), indexed by (position, epoch).

    `random_crops=False`: the centre crop (top = round((h - R) / 2)), the epoch is ignored."""

    def __init__(self, folder: ImageFolder, indices: list[int], resolution: int, seed: int,
                 random_crops: bool = True, hflip: bool = False):
        self.folder, self.indices = folder, indices
        self.resolution, self.seed = resolution, seed
        self.random_crops, self.hflip = random_crops, hflip
        self.resize_to = round(RESIZE_RATIO * resolution)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[torch.Tensor, int]:
        position, epoch = key if isinstance(key, tuple) else (key, 0)
        index = self.indices[position]
        path, label = self.folder.samples[index]
        image = TF.resize(read_image_rgb(path), self.resize_to, interpolation=transforms.InterpolationMode.LANCZOS)
        width, height = image.size
        size = self.resolution
        flip = False
        if self.random_crops:
            generator = torch.Generator().manual_seed(hash((self.seed, epoch, index)) & 0x7FFFFFFF)
            top = int(torch.randint(0, height - size + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - size + 1, (1,), generator=generator))
            flip = self.hflip and bool(torch.rand((), generator=generator) < 0.5)
        else:
            top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
        image = TF.crop(image, top, left, size, size)
        if flip:
            image = TF.hflip(image)
        return TF.to_tensor(image).mul_(2).sub_(1), label


def split_image_folder(root: str | Path, resolution: int, val_fraction: float, seed: int, hflip: bool = False,
                       val_max_images: int | None = None) -> tuple[FolderImages, FolderImages | None]:
    """-> (train, held-out) subsets of the ImageFolder at `root`; the split depends only on `seed`."""
    root = Path(root)
    if not root.is_dir():
        raise MissingInputError(f"image folder not found: {root} (expected <root>/<class>/<image> files)")
    try:
        folder = ImageFolder(str(root), is_valid_file=is_image_file)
    except FileNotFoundError as error:  # no class folders, or no images in them
        raise MissingInputError(f"{root}: {error}") from None
    order = torch.randperm(len(folder), generator=torch.Generator().manual_seed(seed)).tolist()
    num_val = int(round(val_fraction * len(order)))
    if val_max_images is not None:
        num_val = min(num_val, val_max_images)
    held_out = FolderImages(folder, sorted(order[:num_val]), resolution, seed, random_crops=False) if num_val else None
    return FolderImages(folder, sorted(order[num_val:]), resolution, seed, hflip=hflip), held_out


class EpochBatchSampler:
    """Batches of (position, epoch) keys for one rank: a seeded permutation per epoch, the tail that
    would make ranks unequal dropped, and a start offset (in batches) for resuming inside an epoch."""

    def __init__(self, dataset_size: int, batch_size: int, rank: int, world_size: int, seed: int):
        self.dataset_size, self.batch_size = dataset_size, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.batches_per_epoch = dataset_size // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{dataset_size} training images are fewer than one global batch "
                             f"({batch_size} per rank x {world_size} ranks): lower --batch-size")
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, start_batch: int) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = torch.randperm(self.dataset_size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        mine = order[: self.batches_per_epoch * self.batch_size * self.world_size][self.rank:: self.world_size]
        for b in range(self.start_batch, self.batches_per_epoch):
            yield [(index, self.epoch) for index in mine[b * self.batch_size: (b + 1) * self.batch_size].tolist()]


def batches_from(dataset: Dataset, sampler: EpochBatchSampler, start_step: int, num_workers: int,
                 pin_memory: bool = False) -> Iterator[torch.Tensor]:
    """Endless image batches starting at global step `start_step` (epochs roll over)."""
    step = start_step
    while True:
        epoch, position = divmod(step, sampler.batches_per_epoch)
        sampler.set_position(epoch, position)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                            worker_init_fn=ignore_stop_signals)  # only the trainer decides to stop
        with stop_signals_blocked():  # the workers start here, deaf to Slurm's signals from their first instant
            batches = iter(loader)
        for images, _ in batches:
            yield images
            step += 1
