"""`manifest.json` of a token-shard directory: what the shards hold and how they were made.

Written last by `var-prep extract` (its presence means the extraction finished), read by the loader
to plan epochs (per-shard record counts) and to refuse shards made for another model. Each shard's
byte size and sha256 are recorded: the loader compares every local shard's size at start (a
truncated or replaced shard fails in the first second, not at step 80), and `var-prep verify`
recomputes the checksums. The VAE is recorded by file hash (`vae_sha256`) and by a fingerprint of
its codebook and phi convs (`vae_codebook_sha256`), so a re-saved copy (.pth -> .safetensors) is
still recognised as the same VAE. Manifests written before these fields have them empty, and the
checks that need them are skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from var_train import fileio
from var_train.errors import CorruptFileError, MismatchError, MissingInputError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class ShardInfo:
    name: str          # file name inside the shard directory, e.g. "shard-000000.tar"
    num_records: int
    num_bytes: int = -1  # -1: not recorded (older manifests)
    sha256: str = ""


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
    vae_codebook_sha256: str = ""        # var_train.compatibility.vae_fingerprint of the VAE
    preprocessing: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)   # reason -> count (details in report.json)
    tool: str = ""
    tool_version: str = ""
    created: str = ""
    format_version: int = FORMAT_VERSION

    def check_compatible(self, patch_nums, vocab_size: int, num_classes: int, where: str = "") -> None:
        """Raise MismatchError (a ValueError) listing every way these shards disagree with the model;
        `where` names them in the message (e.g. "of data.val_shards (path)")."""
        differences = []
        if list(patch_nums) != list(self.patch_nums):
            differences.append(f"patch_nums: shards {tuple(self.patch_nums)}, model {tuple(patch_nums)}")
        if int(vocab_size) != self.vocab_size:
            differences.append(f"vocab_size: shards {self.vocab_size}, model {vocab_size}")
        if int(num_classes) != self.num_classes:
            differences.append(f"num_classes: shards {self.num_classes}, model {num_classes}")
        if differences:
            raise MismatchError(f"the token shards {where + ' ' if where else ''}do not match the model (set these "
                                "model.* keys to the shards' values, or extract shards for this model):\n  "
                                + "\n  ".join(differences))

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


def is_local(spec: str) -> bool:
    """A local folder rather than a URL of shards (pipe:, http(s)://, s3://; file:// counts as local)."""
    return spec.startswith("file://") or ("://" not in spec and not spec.startswith("pipe:"))


def read_manifest(shards_dir: str | Path) -> Manifest:
    path = Path(shards_dir) / MANIFEST_NAME
    if not path.is_file():
        raise MissingInputError(f"no {MANIFEST_NAME} in {shards_dir}: not a token-shard directory, or its "
                                f"extraction has not finished (run `var-prep extract` again to complete it)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{path} is not valid JSON ({e}): re-run `var-prep extract` with the same "
                               f"arguments to rewrite it") from e
    return Manifest.from_dict(data)


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write JSON to a temporary name, then rename: readers never see half a file (a full disk
    raises DiskFullError and leaves no temporary file)."""
    fileio.write_json_atomic(path, data, indent=1)


def write_manifest(shards_dir: str | Path, manifest: Manifest) -> Path:
    path = Path(shards_dir) / MANIFEST_NAME
    write_json_atomic(path, manifest.to_dict())
    return path


# -- shard integrity ----------------------------------------------------------------------------------
def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Streamed sha256 of a file (hashlib releases the GIL, so loader workers keep running)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_shard_sizes(shards_dir: str | Path, manifest: Manifest) -> None:
    """Compare the byte size of every shard of a local folder with the manifest (one stat per shard);
    raise CorruptFileError naming the first few that differ."""
    wrong = []
    for shard in manifest.shards:
        path = Path(shards_dir) / shard.name
        if shard.num_bytes < 0 or not path.is_file():
            continue  # not recorded, or missing (reported by the loader with the other missing shards)
        size = path.stat().st_size
        if size != shard.num_bytes:
            wrong.append(f"{shard.name} ({size} bytes, manifest {shard.num_bytes})")
    if wrong:
        raise CorruptFileError(f"{len(wrong)} shard(s) in {shards_dir} differ in size from the manifest "
                               f"(truncated or replaced): {', '.join(wrong[:5])}; run `var-prep verify {shards_dir}`, "
                               f"then re-extract them (delete the bad shard and its .json, run `var-prep extract` again)")


def verify_shards(shards_dir: str | Path, checksums: bool = True, progress=None) -> list[str]:
    """Every problem found in a shard directory (missing shards, wrong sizes, wrong checksums), one
    line each; an empty list means the shards are exactly those the manifest describes."""
    manifest = read_manifest(shards_dir)
    problems = []
    for shard in manifest.shards:
        path = Path(shards_dir) / shard.name
        if not path.is_file():
            problems.append(f"{shard.name}: missing")
            continue
        size = path.stat().st_size
        if shard.num_bytes >= 0 and size != shard.num_bytes:
            problems.append(f"{shard.name}: {size} bytes, manifest {shard.num_bytes}")
        elif checksums and shard.sha256:
            actual = file_sha256(path)
            if actual != shard.sha256:
                problems.append(f"{shard.name}: sha256 {actual[:16]}..., manifest {shard.sha256[:16]}...")
        if progress is not None:
            progress(shard.name)
    return problems
