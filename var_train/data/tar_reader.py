"""A minimal, fast reader of WebDataset tars of small records (the token shards).

Python's `tarfile` spends ~100 us parsing each member header (checksums, pax, many small
reads); a token record is three members of 1-2 KB, so it caps a loader process at a few thousand
records/s. This reader reads the file and walks the 512-byte ustar/GNU headers directly (a few
microseconds a member). It yields samples in WebDataset's own format (`__key__`, `__url__` and one
bytes value per extension, key and extension split at the first dot of the basename), so the rest
of the pipeline is stock `webdataset` (shuffle, batched, WebLoader). Archives it does not
understand raise ValueError naming the file and offset; it never guesses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")
_SKIPPED = (b"1", b"2", b"3", b"4", b"5", b"6", b"g", b"V", b"M")


def _octal(field: bytes, url: str, offset: int) -> int:
    if field[:1] and field[0] & 0x80:   # GNU base-256 (members > 8 GiB): never in token shards
        raise ValueError(f"{url}: base-256 size field at offset {offset} is not supported")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise ValueError(f"{url}: not a tar header at offset {offset} (size field {field!r})") from None


def _pax_path(payload: bytes) -> str | None:
    """The `path` record of a pax extended header, if any ("<len> path=<value>\\n" records)."""
    position = 0
    while position < len(payload):
        space = payload.index(b" ", position)
        length = int(payload[position:space])
        keyword, _, value = payload[space + 1:position + length - 1].partition(b"=")
        if keyword == b"path":
            return value.decode("utf-8")
        position += length
    return None


def iter_tar_members(url: str | Path) -> Iterator[tuple[str, bytes]]:
    """(member name, content) for each regular file of a tar, in archive order."""
    url = str(url)
    with open(url, "rb") as f:
        data = f.read()  # a shard is tens of MB; one read beats many small ones
    if not data:
        raise ValueError(f"{url}: empty file, not a tar")
    size_total, position, long_name = len(data), 0, None
    while position + BLOCK <= size_total:
        if data[position] == 0 and data[position:position + BLOCK].count(0) == BLOCK:
            return  # end-of-archive marker
        if data[position + 257:position + 262] != b"ustar":
            raise ValueError(f"{url}: not a tar header at offset {position}")
        try:
            size = int(data[position + 124:position + 135], 8)  # 11 octal digits, as tarfile writes them
        except ValueError:
            size = _octal(data[position + 124:position + 136], url, position)
        typeflag = data[position + 156:position + 157]
        start = position + BLOCK
        if start + size > size_total:
            raise ValueError(f"{url}: truncated member at offset {position} "
                             f"({size} bytes announced, {size_total - start} left)")
        header_at, position = position, start + (size + BLOCK - 1) // BLOCK * BLOCK
        if typeflag in _REGULAR:
            if long_name is not None:
                name, long_name = long_name, None
            else:
                end = data.find(b"\0", header_at, header_at + 100)
                name = data[header_at:end if end >= 0 else header_at + 100].decode("utf-8")
                if data[header_at + 345] != 0:
                    end = data.find(b"\0", header_at + 345, header_at + 500)
                    name = data[header_at + 345:end if end >= 0 else header_at + 500].decode("utf-8") + "/" + name
            yield name, data[start:start + size]
        elif typeflag in (b"L", b"x"):
            payload = data[start:start + size]
            long_name = payload.rstrip(b"\0").decode("utf-8") if typeflag == b"L" else _pax_path(payload)
        elif typeflag in _SKIPPED:
            long_name = None
        else:
            raise ValueError(f"{url}: unknown tar member type {typeflag!r} at offset {header_at}")
    if position < size_total:
        raise ValueError(f"{url}: truncated tar header at offset {position}")
    raise ValueError(f"{url}: tar ends without its end-of-archive marker (truncated?)")


def iter_tar_samples(url: str | Path) -> Iterator[dict]:
    """Group consecutive members sharing a key into WebDataset sample dicts."""
    url = str(url)
    sample: dict | None = None
    key = None
    for name, content in iter_tar_members(url):
        dot = name.find(".", name.rfind("/") + 1)
        if dot < 0:
            continue  # no extension: not part of a sample (WebDataset skips these too)
        if name[:dot] != key:
            if sample is not None:
                yield sample
            key = name[:dot]
            sample = {"__key__": key, "__url__": url}
        extension = name[dot + 1:].lower()
        if extension in sample:
            raise ValueError(f"{url}: duplicate member {name!r}")
        sample[extension] = content
    if sample is not None:
        yield sample
