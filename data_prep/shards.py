"""Writing token shards: one WebDataset tar per shard, made visible only once complete."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import webdataset as wds

from var_train.data.records import TokenRecord, encode_record

SHARD_PATTERN = "shard-{index:06d}.tar"
# An integer mtime keeps tarfile from adding a pax header to every member (float mtimes need one),
# and a fixed one makes a shard's bytes depend only on its records (1-rank == N-rank runs).
_FIXED_MTIME = 0


def shard_name(index: int) -> str:
    return SHARD_PATTERN.format(index=index)


def write_shard(path: str | Path, records: Iterable[TokenRecord]) -> int:
    """Write `records` to `path` via `<path>.tmp` and an atomic rename; -> number of records.

    A crash leaves at most a `.tmp` file, which is never mistaken for a shard and is overwritten
    by the next attempt.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with open(tmp, "wb") as stream:
        writer = wds.TarWriter(stream, encoder=False, mtime=_FIXED_MTIME)
        for record in records:
            writer.write(encode_record(record))
            count += 1
        writer.close()
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, path)
    return count
