"""`var-prep extract`: images -> multi-scale token shards (WebDataset tars + manifest.json).

Determinism and distribution: the sorted input list is put in a seeded random order (so every
shard mixes all classes; a loader's shuffle buffer could not undo class-sorted shards), then cut
into fixed chunks of `shard_size` items, chunk i -> `shard-{i:06d}.tar`; rank r of W takes the chunks i with i % W == r. Images are
encoded in batches that never cross a chunk, so the tokens of a shard do not depend on the number
of ranks (a 2-rank run writes the same bytes as a 1-rank run).

Crash safety and resume: a shard is written to `shard-NNNNNN.tar.tmp` and renamed; then its
sidecar `shard-NNNNNN.json` (record count, skipped inputs, a hash of its input chunk) is written
the same way and marks the shard done. A restart skips done shards and redoes anything else.
`extract_config.json` pins the settings of a shard directory so a restart with other settings
fails instead of mixing shards; the inputs are recorded by resolved path, so the same input typed
otherwise (relative, absolute, through a link, from another directory) is the same input. Settings
under which no shard was finished bind nothing: a new run replaces them. Options are checked before
anything is written, so a start that fails on them leaves no file. When every shard is done, rank 0
writes `report.json` (every skipped input with its reason) and, last, `manifest.json`.

Bad inputs never stop a run: each is skipped with a reason (see `preprocess.decode_image`);
grayscale, palette, alpha and CMYK images are converted to RGB as the reference does and counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import var_train
from var_train.compatibility import vae_fingerprint
from var_train.data.loader import ignore_stop_signals
from var_train.data.manifest import Manifest, ShardInfo, file_sha256, write_json_atomic, write_manifest
from var_train.data.records import MAX_VOCAB_SIZE, TOKEN_DTYPE, TokenRecord
from var_train.errors import ConfigError, MismatchError, MissingInputError
from var_train.parallel.distributed import barrier as _barrier, default_device, init_distributed, launcher_ranks
from var_train.precision import available_device

from .image_sources import SourceItem, SourceList, list_sources
from .preprocess import BadImage, ReferenceTransform, decode_image
from .shards import shard_name, write_shard

logger = logging.getLogger(__name__)

CONFIG_NAME = "extract_config.json"
REPORT_NAME = "report.json"
TOOL = "var-prep extract"


@dataclass
class ExtractConfig:
    source: str
    vae: str
    out: str
    resolution: int | None = None           # None: the VQVAE's (16 x the last patch_nums entry)
    patch_nums: tuple[int, ...] | None = None  # None: the schedule the VQVAE file records (released: 1..16)
    flip: bool = False
    crops: int = 1
    seed: int = 0                      # order of the images over the shards, and random crops
    shuffle: bool = True               # False: shards follow the sorted input order
    shard_size: int = 5000
    batch_size: int = 64
    num_workers: int = 4
    min_size: int = 0                  # > 0: skip images whose shorter side is smaller (opt-in)
    input_format: str = "auto"
    num_classes: int | None = None
    device: str = "auto"
    max_shards: int | None = None      # stop after this many shards (per rank) in this run
    progress: bool = True


@dataclass
class ExtractionSummary:
    out: Path
    complete: bool
    num_shards: int
    shards_done_now: int
    records_written_now: int
    skipped_now: int
    seconds: float
    rank: int = 0
    world_size: int = 1
    num_records: int | None = None           # whole dataset, when complete
    skipped_reasons: dict = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return (self.records_written_now + self.skipped_now) / max(self.seconds, 1e-9)


# -- distributed ---------------------------------------------------------------------------------
def _init_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank), with the project's one set of launcher rules
    (`var_train.parallel.distributed`); a single process joins no group.

    Ranks only need a barrier at the end (no tensors travel), so the group is gloo on every device;
    its timeout is long because ranks may finish hours apart on unevenly sized inputs.
    """
    _, world_size, _ = launcher_ranks()
    if world_size > 1 or dist.is_initialized():
        info = init_distributed(backend="gloo", timeout=timedelta(hours=48))
        return info.rank, info.world_size, info.local_rank
    return 0, 1, 0


def _pick_device(requested: str, local_rank: int) -> torch.device:
    """`auto` and a bare `cuda` both mean this rank's own GPU (its local rank among the GPUs it sees),
    so eight ranks on a node don't all land on GPU 0; `cuda:N` and `cpu` are taken as written."""
    if requested == "auto":
        return default_device(local_rank)
    try:
        device = available_device(requested)
    except ConfigError as error:
        raise ConfigError(f"--device {error}") from None
    if device.type == "cuda" and device.index is None:
        return default_device(local_rank)
    return device


# -- bookkeeping files -----------------------------------------------------------------------------
def _chunk_hash(items: list[SourceItem]) -> str:
    """Which images, in which order, with which labels: resolved locations, not the paths as typed."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item.key}\t{item.label}\t{item.identity}\n".encode())
    return digest.hexdigest()


def _sidecar_path(out: Path, index: int) -> Path:
    return out / (Path(shard_name(index)).stem + ".json")


def _read_sidecar(out: Path, index: int) -> dict | None:
    path = _sidecar_path(out, index)
    if not path.is_file() or not (out / shard_name(index)).is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # torn by a crash despite the rename (e.g. a full disk): redo the shard


def _finished_shards(out: Path) -> list[str]:
    """Shards marked done (tar and sidecar), whatever settings made them."""
    return sorted(p.name for p in out.glob("shard-*.json") if p.with_suffix(".tar").is_file())


def _check_or_write_run_config(out: Path, settings: dict, rank: int) -> None:
    """Refuse other settings than those of the finished shards in `out`; rank 0 records them.

    Settings no finished shard was made with (a run stopped before its first one) are replaced.
    """
    path = out / CONFIG_NAME
    # Shards before settings: a rank that still reads the old settings then cannot see a shard that
    # rank 0 finished under the new ones (rank 0 replaces the settings before it writes any shard).
    finished = _finished_shards(out)
    existing = json.loads(path.read_text()) if path.is_file() else None
    differences = [] if existing is None else [f"{k}: existing {existing.get(k)!r}, now {v!r}"
                                               for k, v in settings.items() if existing.get(k) != v]
    if differences and finished:
        hint = ("\n(inputs_sha256 covers which images, with which labels, by resolved path; a folder extracted "
                "by an earlier var-prep, which recorded paths as typed, differs there too)"
                if existing.get("inputs_sha256") != settings["inputs_sha256"] else "")
        raise MismatchError(f"{out} holds {len(finished)} shard(s) extracted with other settings; use a new --out "
                            f"or the same settings:\n  " + "\n  ".join(differences) + hint)
    if (existing is None or differences) and rank == 0:
        if differences:
            logger.info("%s: replacing the settings of a run that finished no shard", out)
        write_json_atomic(path, settings)


# -- decoding in DataLoader workers ------------------------------------------------------------------
class _ImageItems(Dataset):
    """Item index -> (index, images (N, 3, R, R) or None, original mode, reason if skipped)."""

    def __init__(self, items: list[SourceItem], transform: ReferenceTransform, min_size: int):
        self.items, self.transform, self.min_size = items, transform, min_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        try:
            image, mode = decode_image(item.read_bytes(), self.min_size)
            return index, self.transform(image, item.key), mode, None
        except BadImage as e:
            return index, None, None, str(e)
        except OSError as e:  # missing or unreadable file
            return index, None, None, f"cannot read file: {e.strerror or e}"
        except Exception as e:  # anything else one odd file can raise must not end a long run
            return index, None, None, f"unexpected error: {type(e).__name__}: {e}"


def _keep_list(batch):
    return batch


def _shard_batches(shard_indices: list[int], shard_size: int, num_items: int, batch_size: int) -> list[list[int]]:
    """Item-index batches that never cross a shard, in shard order."""
    batches = []
    for shard in shard_indices:
        begin, end = shard * shard_size, min((shard + 1) * shard_size, num_items)
        batches.extend(list(range(b, min(b + batch_size, end))) for b in range(begin, end, batch_size))
    return batches


# -- the extraction ----------------------------------------------------------------------------------
@torch.no_grad()
def _encode(vae, images: torch.Tensor, device: torch.device) -> np.ndarray:
    """(n, 3, R, R) -> (n, L) uint16 tokens, fp32 so ids are exact (no autocast, no TF32)."""
    tokens_per_scale = vae.image_to_tokens(images.to(device, non_blocking=True))
    return torch.cat(tokens_per_scale, dim=1).cpu().numpy().astype(TOKEN_DTYPE)


class _ShardAccumulator:
    """Collects one shard's records and skips, and writes tar + sidecar when the shard is complete."""

    def __init__(self, out: Path, index: int, items: list[SourceItem]):
        self.out, self.index, self.items = out, index, items
        self.records: list[TokenRecord] = []
        self.skipped: list[dict] = []
        self.converted: Counter = Counter()
        self.pending = len(items)

    def finish(self) -> int:
        path = self.out / shard_name(self.index)
        write_shard(path, self.records)
        write_json_atomic(_sidecar_path(self.out, self.index), {
            "shard": shard_name(self.index), "num_records": len(self.records),
            "num_bytes": path.stat().st_size, "sha256": file_sha256(path),  # -> manifest; checked by the loader
            "num_inputs": len(self.items), "inputs_sha256": _chunk_hash(self.items),
            "skipped": self.skipped, "converted_modes": dict(self.converted),
        })
        return len(self.records)


def _pending_shards(out: Path, items: list[SourceItem], rank: int, world_size: int, shard_size: int,
                    num_shards: int) -> list[int]:
    """This rank's shards (i % world_size == rank) without a valid done marker."""
    todo = []
    for index in range(rank, num_shards, world_size):
        chunk = items[index * shard_size:(index + 1) * shard_size]
        sidecar = _read_sidecar(out, index)
        if sidecar is None:
            todo.append(index)
        elif sidecar.get("inputs_sha256") != _chunk_hash(chunk):
            raise MismatchError(f"{out / shard_name(index)} was made from other inputs than now; use a new --out")
    return todo


def _records_from_tokens(good: list[tuple[int, str]], tokens: np.ndarray, items: list[SourceItem], crops: int,
                         flip: bool) -> list[TokenRecord]:
    """Encoder output rows [originals (image-major, crop-minor); flipped, same order] -> one record per image."""
    count = len(good)
    originals = tokens[:count * crops].reshape(count, crops, -1)
    flipped = tokens[count * crops:].reshape(count, crops, -1) if flip else None

    def stored(rows: np.ndarray) -> np.ndarray:
        return rows[0] if crops == 1 else rows   # (L,) for one crop, (crops, L) otherwise

    return [TokenRecord(key=items[index].key, label=items[index].label, tokens=stored(originals[row]),
                        tokens_flip=None if flipped is None else stored(flipped[row]))
            for row, (index, _) in enumerate(good)]


def _extract_shards(todo: list[int], items: list[SourceItem], out: Path, vae, transform: ReferenceTransform,
                    device: torch.device, config: ExtractConfig, rank: int, world_size: int) -> tuple[int, int]:
    """Decode (DataLoader workers), encode and write the shards `todo`; -> (records written, inputs skipped)."""
    if not todo:
        return 0, 0
    size = config.shard_size
    loader = DataLoader(_ImageItems(items, transform, config.min_size),
                        batch_sampler=_shard_batches(todo, size, len(items), config.batch_size),
                        num_workers=config.num_workers, collate_fn=_keep_list,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if config.num_workers else None,
                        worker_init_fn=ignore_stop_signals)
    shards = {index: _ShardAccumulator(out, index, items[index * size:(index + 1) * size]) for index in todo}
    bar = tqdm(total=sum(len(s.items) for s in shards.values()), unit="img", dynamic_ncols=True,
               desc=f"extract rank {rank}" if world_size > 1 else "extract",
               disable=not config.progress or rank != 0)
    records = skipped = 0
    for batch in loader:
        shard = shards[batch[0][0] // size]  # batches never cross shards
        good = []
        for index, images, mode, reason in batch:
            if reason is not None:
                shard.skipped.append({"source": items[index].origin, "reason": reason})
            else:
                good.append((index, mode))
                if mode != "RGB":
                    shard.converted[mode] += 1
        if good:
            images = torch.cat([images for _, images, _, reason in batch if reason is None])
            if config.flip:
                images = torch.cat([images, images.flip(-1)])
            shard.records += _records_from_tokens(good, _encode(vae, images, device), items, config.crops, config.flip)
        shard.pending -= len(batch)
        skipped += len(batch) - len(good)
        bar.update(len(batch))
        if shard.pending == 0:
            records += shard.finish()
            del shards[shard.index]
    bar.close()
    if shards:
        raise RuntimeError(f"shards {sorted(shards)} did not receive all their images (internal error)")
    return records, skipped


def _check_options(config: ExtractConfig) -> None:
    """Refuse impossible numbers before anything is loaded or written."""
    for name in ("shard_size", "batch_size", "crops", "resolution", "max_shards", "num_classes"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if config.num_workers < 0:
        raise ConfigError(f"--num-workers must be 0 (decode in this process) or more, got {config.num_workers}")
    if config.min_size < 0:
        raise ConfigError(f"--min-size must be 0 (keep every decodable image) or more, got {config.min_size}")


def extract_tokens(config: ExtractConfig) -> ExtractionSummary:
    """Run (or resume) an extraction on this process's share of the shards; see the module doc."""
    from var_train.models.checkpoint_io import load_vae

    started = time.time()
    rank, world_size, local_rank = _init_distributed()
    out = Path(config.out)
    _check_options(config)
    device = _pick_device(config.device, local_rank)
    if not Path(config.vae).is_file():
        raise MissingInputError(f"VQVAE checkpoint not found: {config.vae}")
    vae = load_vae(config.vae, patch_nums=None if config.patch_nums is None else tuple(config.patch_nums))
    patch_nums = tuple(vae.patch_nums)
    if config.resolution is not None and config.resolution != vae.resolution:
        scales = ",".join(map(str, patch_nums))
        fits = config.resolution % vae.downsample == 0
        raise MismatchError(f"--resolution {config.resolution} does not match the schedule {scales} "
                            f"({vae.resolution}px at the VQVAE's {vae.downsample}x downsampling): drop --resolution "
                            f"to extract at {vae.resolution}px"
                            + (f", or give --patch-nums ending in {config.resolution // vae.downsample}" if fits else ""))
    config = replace(config, resolution=vae.resolution, patch_nums=patch_nums)
    vocab_size = vae.config["vocab_size"]
    if vocab_size > MAX_VOCAB_SIZE:
        raise ConfigError(f"vocab_size {vocab_size} does not fit the uint16 token records (max {MAX_VOCAB_SIZE})")

    sources: SourceList = list_sources(config.source, config.input_format, config.num_classes)
    items = sources.items
    if not items:
        raise MissingInputError(f"no images found in {config.source} ({len(sources.skipped)} other files skipped)")
    if config.shuffle:
        items = [items[i] for i in np.random.default_rng(config.seed).permutation(len(items))]
    num_shards = -(-len(items) // config.shard_size)
    vae_sha256 = file_sha256(config.vae)
    vae_codebook_sha256 = vae_fingerprint(vae.state_dict())  # recognises a re-saved copy of this VAE
    transform = ReferenceTransform(config.resolution, config.crops, config.seed)
    settings = {"source": sources.description, "num_inputs": len(items), "inputs_sha256": _chunk_hash(items),
                "vae_sha256": vae_sha256, "resolution": config.resolution, "patch_nums": list(patch_nums),
                "flip": config.flip, "crops": config.crops, "seed": config.seed, "shuffle": config.shuffle,
                "shard_size": config.shard_size, "min_size": config.min_size}
    out.mkdir(parents=True, exist_ok=True)  # only once the inputs are known good: a failed start leaves nothing
    _check_or_write_run_config(out, settings, rank)

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    vae = vae.to(device).eval()

    todo = _pending_shards(out, items, rank, world_size, config.shard_size, num_shards)
    if config.max_shards is not None:
        todo = todo[:config.max_shards]
    records_now, skipped_now = _extract_shards(todo, items, out, vae, transform, device, config, rank, world_size)

    _barrier()
    complete = all(_read_sidecar(out, i) is not None for i in range(num_shards))
    summary = ExtractionSummary(out=out, complete=complete, num_shards=num_shards, shards_done_now=len(todo),
                                records_written_now=records_now, skipped_now=skipped_now,
                                seconds=time.time() - started, rank=rank, world_size=world_size)
    if complete:
        manifest = _finalize(out, num_shards, sources, config, patch_nums, vocab_size, vae_sha256, transform,
                             write=rank == 0, vae_codebook_sha256=vae_codebook_sha256)
        summary.num_records, summary.skipped_reasons = manifest.num_records, manifest.skipped
    _barrier()
    return summary


def _finalize(out: Path, num_shards: int, sources: SourceList, config: ExtractConfig, patch_nums, vocab_size: int,
              vae_sha256: str, transform: ReferenceTransform, write: bool, vae_codebook_sha256: str = "") -> Manifest:
    """Aggregate the sidecars into report.json and manifest.json (written by rank 0 only, manifest last)."""
    sidecars = [_read_sidecar(out, i) for i in range(num_shards)]
    skipped = list(sources.skipped) + [s for sidecar in sidecars for s in sidecar["skipped"]]
    reasons = Counter(_reason_class(s["reason"]) for s in skipped)
    converted = Counter()
    for sidecar in sidecars:
        converted.update(sidecar["converted_modes"])
    manifest = Manifest(
        num_records=sum(s["num_records"] for s in sidecars), num_shards=num_shards,
        shards=[ShardInfo(s["shard"], s["num_records"], s.get("num_bytes", -1), s.get("sha256", ""))
                for s in sidecars],
        num_classes=len(sources.class_names), class_names=list(sources.class_names),
        resolution=config.resolution, patch_nums=list(patch_nums), vocab_size=vocab_size,
        num_tokens=sum(p * p for p in patch_nums), has_flip=config.flip, num_crops=config.crops,
        vae_sha256=vae_sha256, vae_path=str(config.vae), vae_codebook_sha256=vae_codebook_sha256,
        preprocessing=transform.describe(),
        source={**sources.description, "shuffled_with_seed": config.seed if config.shuffle else None},
        skipped=dict(reasons), tool=TOOL, tool_version=var_train.__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    if write:
        write_json_atomic(out / REPORT_NAME, {
            "num_inputs": len(sources.items) + len(sources.skipped), "num_records": manifest.num_records,
            "num_skipped": len(skipped), "skipped_by_reason": dict(reasons),
            "converted_to_rgb_by_mode": dict(converted), "skipped": skipped,
        })
        write_manifest(out, manifest)
    return manifest


def _reason_class(reason: str) -> str:
    """The reason without its per-file details (for counts): text before the first ':' or '('."""
    return reason.split(":")[0].split("(")[0].strip()
