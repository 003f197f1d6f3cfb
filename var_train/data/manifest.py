"""`manifest.json` of a token-shard directory: what the shards hold and how they were made.

Written last by `var-prep extract` (its presence means the extraction finished), read by the loader
to plan epochs (per-shard record counts) and to refuse shards made for another model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class ShardInfo:
    name: str          # file name inside the shard directory, e.g. "shard-000000.tar"
    num_records: int


@dataclass
class Manifest:
    num_records: int
    num_shards: int
    shards: list[ShardInfo]
    num_classes: int
    class_names: list[str]
    resolution: int
    patch_nums: list[int]
    vocab_size: int
    num_tokens: int                      # L = sum(pn * pn)
    has_flip: bool = False
    num_crops: int = 1                   # > 1: tokens.npy holds (num_crops, L)
    vae_sha256: str = ""
    vae_path: str = ""
    preprocessing: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)   # reason -> count (details in report.json)
    tool: str = ""
    tool_version: str = ""
    created: str = ""
    format_version: int = FORMAT_VERSION

    def check_compatible(self, patch_nums, vocab_size: int, num_classes: int) -> None:
        """Raise ValueError listing every way these shards disagree with the model."""
        differences = []
        if list(patch_nums) != list(self.patch_nums):
            differences.append(f"patch_nums: shards {tuple(self.patch_nums)}, model {tuple(patch_nums)}")
        if int(vocab_size) != self.vocab_size:
            differences.append(f"vocab_size: shards {self.vocab_size}, model {vocab_size}")
        if int(num_classes) != self.num_classes:
            differences.append(f"num_classes: shards {self.num_classes}, model {num_classes}")
        if differences:
            raise ValueError("token shards do not match the model:\n  " + "\n  ".join(differences))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown manifest keys {unknown} (format_version {data.get('format_version')}; "
                             f"this var_train reads version {FORMAT_VERSION})")
        values = dict(data)
        values["shards"] = [ShardInfo(**s) for s in data.get("shards", [])]
        manifest = cls(**values)
        if manifest.format_version != FORMAT_VERSION:
            raise ValueError(f"manifest format_version {manifest.format_version}, expected {FORMAT_VERSION}")
        if sum(s.num_records for s in manifest.shards) != manifest.num_records or len(manifest.shards) != manifest.num_shards:
            raise ValueError("manifest is inconsistent: per-shard record counts do not add up to num_records/num_shards")
        return manifest


def read_manifest(shards_dir: str | Path) -> Manifest:
    path = Path(shards_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {shards_dir}: not a token-shard directory, or its "
                                f"extraction has not finished (run `var-prep extract` again to complete it)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    return Manifest.from_dict(data)


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write JSON to a temporary name, then rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def write_manifest(shards_dir: str | Path, manifest: Manifest) -> Path:
    path = Path(shards_dir) / MANIFEST_NAME
    write_json_atomic(path, manifest.to_dict())
    return path
