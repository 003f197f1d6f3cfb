"""Writing token shards: one WebDataset tar per shard, made visible only once complete."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterable

import webdataset as wds

from var_train.data.records import TokenRecord, encode_record
from var_train.fileio import disk_full_error, is_disk_full

SHARD_PATTERN = "shard-{index:06d}.tar"
# An integer mtime keeps tarfile from adding a pax header to every member (float mtimes need one),
# and a fixed one makes a shard's bytes depend only on its records (1-rank == N-rank runs).
_FIXED_MTIME = 0


def shard_name(index: int) -> str:
    return SHARD_PATTERN.format(index=index)


def write_shard(path: str | Path, records: Iterable[TokenRecord]) -> int:
    """Write `records` to `path` via `<path>.tmp` and an atomic rename; -> number of records.

    A crash leaves at most a `.tmp` file, which is never mistaken for a shard and is overwritten
    by the next attempt. Any write error removes the `.tmp` file; a full disk raises DiskFullError
    ("no space left on device at <path> (needed ~X, free Y)") instead of a later, misleading error
    from the half-closed tar writer.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    samples = [encode_record(record) for record in records]
    # A tar member is a 512-byte header plus its data padded to 512; 2 zero blocks end the archive.
    needed = sum(512 + -(-len(value) // 512) * 512 for sample in samples
                 for key, value in sample.items() if not key.startswith("__")) + 1024
    needed = -(-needed // 10240) * 10240  # tarfile pads the archive to 10 KiB records
    stream = open(tmp, "wb")
    writer = wds.TarWriter(stream, encoder=False, mtime=_FIXED_MTIME)
    try:
        for sample in samples:
            writer.write(sample)
        writer.close()
        stream.flush()
        os.fsync(stream.fileno())
        stream.close()
        os.replace(tmp, path)
    except BaseException as error:
        # Close quietly: the tar writer would otherwise write its end blocks into the closed (or
        # full) file later and report "write to closed file", hiding the real cause.
        for close in (writer.close, stream.close):
            with contextlib.suppress(Exception):
                close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        if is_disk_full(error):
            raise disk_full_error(path, needed) from error
        raise
    return len(samples)
