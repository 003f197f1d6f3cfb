"""The token-shard record format, defined once for the writer (`var-prep extract`) and the loader.

A record is one image. Inside a WebDataset tar it is the files `<key>.tokens.npy`,
optionally `<key>.tokens_flip.npy`, and `<key>.cls`:

- `tokens.npy`: uint16 `.npy`, every scale's token ids concatenated coarse to fine (row-major
  inside a scale), shape `(L,)` with L = sum(pn * pn); or `(num_crops, L)` when the extraction
  stored several crops of the image (the loader picks one).
- `tokens_flip.npy`: the same for the horizontally flipped image (same shape as `tokens.npy`).
- `cls`: the class id as ASCII digits.

Keys never contain dots (WebDataset splits a member name into key and extension at the first dot
of its basename).
"""

from __future__ import annotations

import ast
import io
import re
from dataclasses import dataclass

import numpy as np

TOKENS_EXT = "tokens.npy"
TOKENS_FLIP_EXT = "tokens_flip.npy"
CLASS_EXT = "cls"
TOKEN_DTYPE = np.uint16
MAX_VOCAB_SIZE = int(np.iinfo(TOKEN_DTYPE).max) + 1

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")
_NPY_MAGIC = b"\x93NUMPY"


class CorruptRecordError(ValueError):
    """A record that cannot be decoded; the message names its shard and key."""

    def __init__(self, shard: str, key: str | None = None, reason: str | None = None):
        if key is None:  # rebuilt from its message (DataLoader re-raising a worker's exception)
            super().__init__(shard)
            return
        self.shard, self.key, self.reason = shard, key, reason
        super().__init__(f"corrupt record {key!r} in shard {shard}: {reason}")


@dataclass
class TokenRecord:
    key: str
    tokens: np.ndarray             # uint16 (L,) or (num_crops, L)
    label: int
    tokens_flip: np.ndarray | None = None


def safe_key(text: str, max_length: int = 120) -> str:
    """A WebDataset-safe key from free text (paths, ids): no dots, no slashes, bounded length."""
    key = _KEY_UNSAFE.sub("_", text).strip("_")
    return key[-max_length:] or "record"


def encode_tokens(tokens: np.ndarray) -> bytes:
    tokens = np.ascontiguousarray(tokens)
    if tokens.dtype != TOKEN_DTYPE:
        raise TypeError(f"tokens must be {np.dtype(TOKEN_DTYPE).name}, got {tokens.dtype}")
    buffer = io.BytesIO()
    np.save(buffer, tokens, allow_pickle=False)
    return buffer.getvalue()


def encode_record(record: TokenRecord) -> dict[str, object]:
    """-> the dict `webdataset.TarWriter.write` takes (values already bytes)."""
    if "." in record.key or "/" in record.key:
        raise ValueError(f"record key must not contain '.' or '/': {record.key!r}")
    sample: dict[str, object] = {"__key__": record.key, TOKENS_EXT: encode_tokens(record.tokens),
                                 CLASS_EXT: str(int(record.label)).encode("ascii")}
    if record.tokens_flip is not None:
        if record.tokens_flip.shape != record.tokens.shape:
            raise ValueError(f"tokens_flip shape {record.tokens_flip.shape} != tokens shape {record.tokens.shape}")
        sample[TOKENS_FLIP_EXT] = encode_tokens(record.tokens_flip)
    return sample


# The header of every record of a shard is the same few bytes; parsing it once and remembering
# the result keeps decoding at np.frombuffer speed (about a microsecond a record).
_header_cache: dict[bytes, tuple[tuple[int, ...], int]] = {}


def decode_tokens(data: bytes) -> np.ndarray:
    """Raw `.npy` bytes -> uint16 array (a read-only view on `data`). Raises ValueError if malformed."""
    if data[:6] != _NPY_MAGIC:
        raise ValueError("not an .npy file (bad magic)")
    major = data[6]
    if major == 1:
        header_end = 10 + int.from_bytes(data[8:10], "little")
    elif major in (2, 3):
        header_end = 12 + int.from_bytes(data[8:12], "little")
    else:
        raise ValueError(f"unsupported .npy version {major}")
    header = data[:header_end]
    parsed = _header_cache.get(header)
    if parsed is None:
        shape = _parse_npy_header(header[10 if major == 1 else 12:])
        parsed = shape, int(np.prod(shape))
        if len(_header_cache) < 64:
            _header_cache[header] = parsed
    shape, count = parsed
    if len(data) - header_end != 2 * count:
        raise ValueError(f"truncated .npy: {len(data) - header_end} bytes of data for shape {shape}")
    return np.frombuffer(data, dtype="<u2", count=count, offset=header_end).reshape(shape)


def _parse_npy_header(text: bytes) -> tuple[int, ...]:
    try:
        header = ast.literal_eval(text.decode("latin1").strip())
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"unreadable .npy header: {e}") from e
    if not isinstance(header, dict) or np.dtype(header.get("descr")) != np.dtype("<u2"):
        raise ValueError(f".npy is not little-endian uint16: {header!r}")
    if header.get("fortran_order"):
        raise ValueError(".npy must be C-ordered")
    shape = tuple(header.get("shape", ()))
    if len(shape) not in (1, 2):
        raise ValueError(f"tokens must be 1-D or 2-D, got shape {shape}")
    return shape


def decode_record(sample: dict, num_tokens: int | None = None) -> TokenRecord:
    """A WebDataset sample dict -> TokenRecord; CorruptRecordError names shard and key on failure."""
    key = sample.get("__key__", "<no key>")
    shard = sample.get("__url__", "<unknown shard>")
    try:
        tokens = decode_tokens(sample[TOKENS_EXT])
        flip = sample.get(TOKENS_FLIP_EXT)
        tokens_flip = decode_tokens(flip) if flip is not None else None
        label = int(sample[CLASS_EXT])
    except KeyError as e:
        raise CorruptRecordError(shard, key, f"missing member {e.args[0]!r}") from None
    except ValueError as e:
        raise CorruptRecordError(shard, key, str(e)) from None
    if num_tokens is not None and tokens.shape[-1] != num_tokens:
        raise CorruptRecordError(shard, key, f"{tokens.shape[-1]} tokens, expected {num_tokens}")
    if tokens_flip is not None and tokens_flip.shape != tokens.shape:
        raise CorruptRecordError(shard, key, f"tokens_flip shape {tokens_flip.shape} != tokens shape {tokens.shape}")
    return TokenRecord(key=key, tokens=tokens, label=label, tokens_flip=tokens_flip)
