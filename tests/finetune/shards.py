"""Token shards for fine-tuning tests: any class subset and any scale schedule, learnable patterns."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tests.training.learnable_shards import VOCAB_SIZE, make_learnable_shards

__all__ = ["VOCAB_SIZE", "make_shards"]


def make_shards(out: str | Path, num_classes: int, patch_nums: Sequence[int] = (1, 2, 3, 4),
                num_records: int = 64, shard_size: int = 32, noise: float = 0.2, seed: int = 0) -> Path:
    """Records with labels 0..num_classes-1 on the `patch_nums` schedule (see make_learnable_shards)."""
    return make_learnable_shards(out, num_records=num_records, shard_size=shard_size, noise=noise, seed=seed,
                                 num_classes=num_classes, patch_nums=tuple(patch_nums))
