"""Atomic file writes: a reader sees the old file or the complete new one, never half of one.

    with atomic_write(path) as tmp:          # any writer that takes a path
        np.savez(tmp, ...)                   # (tmp keeps path's suffix, so savez adds nothing)
    write_text_atomic(path, text)
    write_json_atomic(path, {"a": 1})
    write_bytes_atomic(path, data)

The data go to a temporary file beside `path` (same directory, so the rename never crosses file
systems), are flushed to disk (fsync), and are renamed over `path` (`os.replace`, atomic on POSIX);
the directory entry is then synced too, so a completed write survives a power cut. On any error the
temporary file is removed and `path` is left as it was. Temporary names start with `.tmp-`, so
directory listings that skip hidden files never mistake one for data.

A full disk (ENOSPC, or a quota: EDQUOT) becomes `DiskFullError` "no space left on device at <dir>
(needed ~X, free Y)", after the temporary file is removed; `disk_full_error` builds the same message
for writers that manage their own temporary files (checkpoints, shards).

The one module for this in the project: a leaf (it imports only var_train.errors, itself a leaf), so
every layer, models and data included, may use it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

from var_train.errors import DiskFullError, format_bytes

TMP_PREFIX = ".tmp-"
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(error: BaseException) -> bool:
    """True for ENOSPC / EDQUOT, also when wrapped (DCP and DeepSpeed re-raise writer errors)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DiskFullError) or (isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS):
            return True
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_error(path: str | Path, needed: int | None = None) -> DiskFullError:
    """DiskFullError for a write at `path`: how much space was needed (if known) and is free."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = format_bytes(shutil.disk_usage(folder).free)
    except OSError:
        free = "unknown"
    wanted = f"~{format_bytes(needed)}" if needed else "unknown"
    error = DiskFullError(f"no space left on device at {path} (needed {wanted}, free {free}); free some space "
                          f"(or choose another folder) and run the same command again")
    error.errno = errno.ENOSPC  # str() stays the message alone (no "[Errno 28]" prefix)
    return error


def temporary_path(path: str | Path) -> Path:
    """A unique name beside `path` that keeps its suffix (writers such as np.savez and PIL go by it)."""
    path = Path(path)
    return path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{path.name}")


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a directory's) data to disk; a no-op where the platform cannot."""
    flags = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if Path(path).is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# The process's umask, read once (os.umask can only be read by setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _give_default_mode(path: Path) -> None:
    """The mode a plain `open(path, "w")` would have given (0644 under the usual umask): some writers
    create their file 0600 (safetensors does), which colleagues on a shared cluster cannot read."""
    with contextlib.suppress(FileNotFoundError):
        default = (0o777 if path.is_dir() else 0o666) & ~_UMASK
        if path.stat().st_mode & 0o777 != default:
            os.chmod(path, default)


@contextlib.contextmanager
def atomic_write(path: str | Path, *, fsync: bool = True, expected_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to; on success it replaces `path`.
    `expected_bytes` (optional) is quoted as the space needed if the disk fills up."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        _give_default_mode(tmp)
        if fsync:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        written = 0
        with contextlib.suppress(OSError):
            written = tmp.stat().st_size
            tmp.unlink()
        if is_disk_full(error) and not isinstance(error, DiskFullError):
            raise disk_full_error(path, expected_bytes or written or None) from error
        raise
    if fsync:
        fsync_path(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_write(path, expected_bytes=len(data)) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, data: Any, indent: int | None = 2) -> Path:
    """JSON (with a trailing newline) written atomically."""
    return write_text_atomic(path, json.dumps(data, indent=indent) + "\n")


class LineAppender:
    """Append whole lines to a log file (JSONL): a line is written by one `os.write` on an O_APPEND
    descriptor and, if that fails part-way (a full disk), the file is cut back to where it was, so
    the file never ends in half a line. Opening repairs a torn last line left by an older writer or
    a power cut (`repaired` tells whether it had to)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.repaired = repair_torn_tail(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, line: str) -> None:
        data = (line if line.endswith("\n") else line + "\n").encode()
        start = os.fstat(self._fd).st_size
        try:
            written = os.write(self._fd, data)
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError as error:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start)
            if is_disk_full(error):
                raise disk_full_error(self.path, len(data)) from error
            raise

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def repair_torn_tail(path: str | Path) -> bool:
    """Cut a file back to its last newline if it ends in a partial line; -> whether it did."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        handle.seek(max(0, size - 1))
        if handle.read(1) == b"\n":
            return False
        block, end = 1 << 16, size
        keep = 0
        while end > 0:  # find the last newline, reading backwards
            start = max(0, end - block)
            handle.seek(start)
            chunk = handle.read(end - start)
            index = chunk.rfind(b"\n")
            if index >= 0:
                keep = start + index + 1
                break
            end = start
        handle.truncate(keep)
    return True
