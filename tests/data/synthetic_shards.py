"""Synthetic token shards with known contents (token values encode the record index)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.shards import shard_name, write_shard
from var_train.data.manifest import Manifest, ShardInfo, write_manifest
from var_train.data.records import TokenRecord


def record_tokens(index: int, num_tokens: int, vocab_size: int, variant: int = 0) -> np.ndarray:
    """Tokens of record `index`: position 0 holds the index (mod vocab), the rest a seeded pattern."""
    rng = np.random.default_rng([index, variant])
    tokens = rng.integers(0, vocab_size, size=num_tokens).astype(np.uint16)
    tokens[0] = index % vocab_size
    tokens[1] = variant
    return tokens


def make_token_shards(out: str | Path, *, num_records: int, shard_size: int, patch_nums=(1, 2, 3, 4),
                      vocab_size: int = 4096, num_classes: int = 10, flip: bool = False, crops: int = 1,
                      shard_sizes: list[int] | None = None) -> Manifest:
    """Write shards where record i has key f"r{i:07d}", label i % num_classes, and tokens from
    `record_tokens` (variant 0 = original, 1 = flipped; crop c adds 2 * c)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    num_tokens = sum(p * p for p in patch_nums)
    sizes = shard_sizes or [min(shard_size, num_records - s) for s in range(0, num_records, shard_size)]
    shards, index = [], 0
    for shard_index, size in enumerate(sizes):
        records = []
        for i in range(index, index + size):
            def variants(flipped):
                rows = [record_tokens(i, num_tokens, vocab_size, 2 * c + flipped) for c in range(crops)]
                return rows[0] if crops == 1 else np.stack(rows)
            records.append(TokenRecord(key=f"r{i:07d}", tokens=variants(0), label=i % num_classes,
                                       tokens_flip=variants(1) if flip else None))
        write_shard(out / shard_name(shard_index), records)
        shards.append(ShardInfo(shard_name(shard_index), size))
        index += size
    manifest = Manifest(num_records=index, num_shards=len(shards), shards=shards, num_classes=num_classes,
                        class_names=[str(c) for c in range(num_classes)], resolution=16 * patch_nums[-1],
                        patch_nums=list(patch_nums), vocab_size=vocab_size, num_tokens=num_tokens,
                        has_flip=flip, num_crops=crops, tool="tests/data/synthetic_shards.py")
    write_manifest(out, manifest)
    return manifest
