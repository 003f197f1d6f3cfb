"""Token shards a tiny VAR can learn: each class has its own token pattern, with some noise."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from data_prep.shards import shard_name, write_shard
from tests.models.tiny import VAE_KW
from var_train.data.manifest import Manifest, ShardInfo, write_manifest
from var_train.data.records import TokenRecord
from var_train.models import VQVAE
from var_train.models.checkpoint_io import save_model

PATCH_NUMS = (1, 2, 3, 4)
VOCAB_SIZE, NUM_CLASSES = 64, 10


def make_learnable_shards(out: str | Path, num_records: int = 128, shard_size: int = 32, noise: float = 0.2,
                          seed: int = 0, num_classes: int = NUM_CLASSES,
                          patch_nums: Sequence[int] = PATCH_NUMS) -> Path:
    """Records with labels 0..num_classes-1; class c's tokens follow its own pattern plus noise."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    num_tokens = sum(p * p for p in patch_nums)
    positions = np.arange(num_tokens)
    shards = []
    for shard_index, start in enumerate(range(0, num_records, shard_size)):
        records = []
        for i in range(start, min(num_records, start + shard_size)):
            label = i % num_classes
            tokens = (label * 7 + positions * 3) % VOCAB_SIZE
            noisy = rng.random(num_tokens) < noise
            tokens[noisy] = rng.integers(0, VOCAB_SIZE, noisy.sum())
            records.append(TokenRecord(key=f"r{i:06d}", tokens=tokens.astype(np.uint16), label=label))
        write_shard(out / shard_name(shard_index), records)
        shards.append(ShardInfo(shard_name(shard_index), len(records)))
    write_manifest(out, Manifest(num_records=num_records, num_shards=len(shards), shards=shards,
                                 num_classes=num_classes, class_names=[str(c) for c in range(num_classes)],
                                 resolution=16 * patch_nums[-1], patch_nums=list(patch_nums),
                                 vocab_size=VOCAB_SIZE, num_tokens=num_tokens, has_flip=False, num_crops=1,
                                 tool="tests/training/learnable_shards.py"))
    return out


def make_tiny_vae(path: str | Path) -> Path:
    torch.manual_seed(0)
    return save_model(VQVAE(**VAE_KW), path)
