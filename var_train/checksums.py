"""Per-file checksums of a checkpoint folder: written with every checkpoint, verified before use.

`checksums.json` in a checkpoint folder lists every other file (relative path -> size and digest),
except `metadata.json`, which is written after it and carries the checksum of checksums.json
itself. The digest is XXH3-128 (the `xxhash` package): the point is to catch accidental damage
(a truncated copy, flipped bits, a half-written file from a full disk or a crash), for which a
128-bit non-cryptographic hash is as good as sha256 and about 8x faster here (7 GB/s vs 0.9 GB/s
per core; BENCHMARKS.md has the cost per d16 checkpoint). A cryptographic hash would not make a
checkpoint from a stranger safe either (whoever sends the files also sends checksums.json): what
makes loading safe is that nothing in a checkpoint can run code (var_train/safe_dcp.py), and the
format to share is the exported .safetensors.

Files are hashed after they are written (they are still in the page cache), split over the ranks
(`hash_files` of a share of the names), streamed in 4 MiB blocks.

An exported weights file has no folder to carry a checksums.json, so it carries its own:
`tensors_digest`, a digest of the tensors themselves, recorded in the file's metadata and checked
on every read (a flipped bit inside the tensor data is invisible to the safetensors format).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import xxhash

from var_train.fileio import write_json_atomic

CHECKSUMS_FILE = "checksums.json"
ALGORITHM = "xxh3_128"
_BLOCK = 4 << 20


def file_digest(path: str | Path) -> str:
    digest = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """XXH3-128 of a state dict's content (names, dtypes, shapes and bytes, in name order): the same
    for the same tensors however the file that holds them lays them out."""
    digest = xxhash.xxh3_128()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def list_files(folder: str | Path, exclude: tuple[str, ...] = ()) -> list[str]:
    """Relative paths of every file under `folder`, sorted (so all ranks list the same order)."""
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and str(p.relative_to(folder)) not in exclude)


def hash_files(folder: str | Path, names: list[str]) -> dict[str, dict]:
    folder = Path(folder)
    return {name: {"bytes": (folder / name).stat().st_size, ALGORITHM: file_digest(folder / name)} for name in names}


def write_checksums(folder: str | Path, entries: dict[str, dict]) -> str:
    """Write checksums.json; -> its own digest (to record in metadata.json)."""
    path = Path(folder) / CHECKSUMS_FILE
    write_json_atomic(path, {"algorithm": ALGORITHM, "files": dict(sorted(entries.items()))}, indent=1)
    return file_digest(path)


def verify_folder(folder: str | Path, checksums_digest: str | None = None, exclude: tuple[str, ...] = ()) -> list[str]:
    """Every problem of `folder` against its checksums.json, one line each (empty: intact).
    `checksums_digest` (from metadata.json) also guards checksums.json itself."""
    folder = Path(folder)
    path = folder / CHECKSUMS_FILE
    if not path.is_file():
        return [f"{path.name} is missing"]
    if checksums_digest and file_digest(path) != checksums_digest:
        return [f"{path.name} differs from the digest recorded in metadata.json"]
    try:
        recorded = json.loads(path.read_text())
        files, algorithm = recorded["files"], recorded["algorithm"]
    except (ValueError, KeyError, TypeError) as error:
        return [f"{path.name} is unreadable ({error})"]
    if algorithm != ALGORITHM:
        return [f"{path.name} uses {algorithm!r}; this var_train checks {ALGORITHM!r}"]
    problems = []
    for name, expected in files.items():
        file = folder / name
        if not file.is_file():
            problems.append(f"{name}: missing")
        elif file.stat().st_size != expected["bytes"]:
            problems.append(f"{name}: {file.stat().st_size} bytes, recorded {expected['bytes']} (truncated or replaced)")
        elif file_digest(file) != expected[ALGORITHM]:
            problems.append(f"{name}: contents differ from the recorded checksum (corrupted)")
    unknown = [name for name in list_files(folder, exclude + (CHECKSUMS_FILE,)) if name not in files]
    problems += [f"{name}: not written by the save (unexpected file)" for name in unknown]
    return problems
