"""Reference statistics of real images: computed once, cached as `.npz`, read back in three formats.

- Ours (written by `var-train fid-stats`): `mu` (D,) and `sigma` (D, D) float64, `count`,
  `extractor` (the feature extractor's name: statistics from another extractor are refused),
  `resolution`, and optionally `features` (N, D) float32 for precision/recall.
- OpenAI ADM reference batches (e.g. `VIRTUAL_imagenet256_labeled.npz`): `mu`/`sigma` of TF
  Inception pool_3 features (torch-fidelity's Inception is a port of that network, so they are used
  as they are with the "inception" extractor), and/or `arr_0`: uint8 images (N, H, W, 3), whose
  features we compute (needed for precision/recall, and for FID with any other extractor).
- An image folder (any layout; class subfolders allowed): every image is centre-cropped to a
  square and resized to the resolution (ADM's reference-batch preprocessing), then scored.

Statistics use the unbiased covariance (ddof=1), as torchmetrics and ADM do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from var_train.data.images import list_image_files, read_image_rgb
from var_train.errors import MismatchError, MissingInputError
from var_train.fileio import atomic_write
from var_train.parallel.distributed import barrier, collective_device, get_rank, get_world_size, is_main_process

from .features import FeatureExtractor, to_uint8_images

STATS_FORMAT = "var_train-fid-stats-v1"
ADM_EXTRACTOR = "adm-tf-inception-pool3"  # what ADM's mu/sigma were computed with
INCEPTION_NAMES = ("inception-v3-compat", ADM_EXTRACTOR)


@dataclass
class ReferenceStatistics:
    mu: np.ndarray                      # (D,) float64
    sigma: np.ndarray                   # (D, D) float64
    count: int | None                   # images behind mu/sigma (None: unknown, ADM stats)
    extractor: str                      # feature extractor name
    resolution: int | None = None
    features: np.ndarray | None = None  # (N, D) float32 for precision/recall
    source: str = ""

    @property
    def num_features(self) -> int:
        return int(self.mu.shape[0])

    def check_extractor(self, extractor: FeatureExtractor) -> None:
        same = self.extractor == extractor.name or (self.extractor in INCEPTION_NAMES and extractor.name in INCEPTION_NAMES)
        if not same or self.num_features != extractor.num_features:
            raise MismatchError(f"reference statistics {self.source or ''} were computed with {self.extractor!r} "
                                f"({self.num_features} features), but evaluation uses {extractor.name!r} "
                                f"({extractor.num_features} features): recompute them with `var-train fid-stats`")


def statistics_from_features(features: torch.Tensor | np.ndarray, extractor_name: str, resolution: int | None,
                             keep_features: bool = True, source: str = "") -> ReferenceStatistics:
    array = np.asarray(features.cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if array.ndim != 2 or len(array) < 2:
        raise ValueError(f"need at least 2 feature vectors (N, D) for statistics, got shape {array.shape}")
    return ReferenceStatistics(mu=array.mean(axis=0), sigma=np.cov(array, rowvar=False), count=len(array),
                               extractor=extractor_name, resolution=resolution,
                               features=array.astype(np.float32) if keep_features else None, source=source)


def save_reference_stats(stats: ReferenceStatistics, path: str | Path) -> Path:
    """Write `.npz` (atomically: a temporary name then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = dict(format=np.array(STATS_FORMAT), mu=stats.mu.astype(np.float64), sigma=stats.sigma.astype(np.float64),
                  count=np.array(-1 if stats.count is None else stats.count), extractor=np.array(stats.extractor),
                  resolution=np.array(-1 if stats.resolution is None else stats.resolution))
    if stats.features is not None:
        arrays["features"] = stats.features.astype(np.float32)
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as stream:  # a file object: np.savez would append ".npz" to a name
            np.savez(stream, **arrays)
    return path


# -- images in -------------------------------------------------------------------------------------
def center_crop_resize(image: Image.Image, resolution: int) -> np.ndarray:
    """ADM's reference-batch preprocessing: halve with a box filter while the shorter side is at
    least twice the target, resize (bicubic) so it equals the target, crop the centre square."""
    image = image.convert("RGB")  # a no-op for images from read_image_rgb
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.Resampling.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - resolution) // 2, (array.shape[1] - resolution) // 2
    return array[top:top + resolution, left:left + resolution]


def folder_resolution(files: list[Path]) -> int:
    return min(read_image_rgb(files[0]).size)


def image_file_batches(files: list[Path], resolution: int, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(files), batch_size):
        arrays = []
        for file in files[start:start + batch_size]:
            arrays.append(center_crop_resize(read_image_rgb(file), resolution))
        yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def nhwc_batches(images: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(images), batch_size):
        yield torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).permute(0, 3, 1, 2).contiguous()


def token_shard_batches(shards_dir: str | Path, vae, batch_size: int, rank: int = 0, world_size: int = 1,
                        limit: int | None = None) -> Iterator[torch.Tensor]:
    """Real images decoded from token shards by the VQVAE (`vae.tokens_to_image`): what the model
    can at best reproduce. This rank reads shards rank, rank + world_size, ...; the first crop of
    multi-crop records; at most `limit` images over all ranks."""
    from var_train.data import decode_record, read_manifest
    from var_train.data.tar_reader import iter_tar_samples

    manifest = read_manifest(shards_dir)
    if list(manifest.patch_nums) != list(vae.patch_nums):
        raise MismatchError(f"token shards {shards_dir} use patch_nums {tuple(manifest.patch_nums)}, the VQVAE "
                            f"{tuple(vae.patch_nums)}")
    sizes = [pn * pn for pn in manifest.patch_nums]
    device = next(vae.parameters()).device
    quota = None if limit is None else limit // world_size + (rank < limit % world_size)
    pending: list[np.ndarray] = []
    emitted = 0

    def decode(rows: list[np.ndarray]) -> torch.Tensor:
        tokens = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)
        return vae.tokens_to_uint8_image(list(tokens.split(sizes, dim=1))).cpu()

    for shard in manifest.shards[rank::world_size]:
        for sample in iter_tar_samples(Path(shards_dir) / shard.name):
            if quota is not None and emitted + len(pending) >= quota:
                break
            tokens = decode_record(sample, manifest.num_tokens).tokens
            pending.append(tokens[0] if tokens.ndim == 2 else tokens)
            if len(pending) == batch_size:
                yield decode(pending)
                emitted += len(pending)
                pending = []
    if pending:
        yield decode(pending)


# -- features --------------------------------------------------------------------------------------
@torch.no_grad()
def extract_features(batches: Iterable[torch.Tensor], extractor: FeatureExtractor, total: int | None = None,
                     progress: bool = True, desc: str = "features") -> torch.Tensor:
    """uint8 image batches -> (N, D) float32 features on the CPU, with a progress bar."""
    features = []
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for batch in batches:
            features.append(extractor(to_uint8_images(batch)).features.cpu())
            bar.update(len(batch))
    return torch.cat(features) if features else torch.empty(0, extractor.num_features)


def gather_features(local: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Concatenate every rank's (N_r, D) rows in rank order, on every rank (uneven N_r allowed)."""
    if get_world_size() == 1:
        return local
    from torchmetrics.utilities.distributed import gather_all_tensors

    moved = local.to(device) if device is not None else local
    return torch.cat([part.cpu() for part in gather_all_tensors(moved)])


def statistics_of_images(images: np.ndarray | list[Path], extractor: FeatureExtractor, *, resolution: int,
                         batch_size: int = 100, keep_features: bool = True, progress: bool = True,
                         source: str = "") -> ReferenceStatistics:
    """NHWC uint8 array or image files -> statistics. Distributed when a process group exists: each
    rank extracts a contiguous slice, then the features are gathered (every rank gets the result)."""
    rank, world = get_rank(), get_world_size()
    per_rank = math.ceil(len(images) / world)
    part = images[rank * per_rank:(rank + 1) * per_rank]
    batches = nhwc_batches(part, batch_size) if isinstance(images, np.ndarray) else image_file_batches(part, resolution, batch_size)
    local = extract_features(batches, extractor, total=len(part), progress=progress and rank == 0)
    features = gather_features(local, collective_device())
    return statistics_from_features(features, extractor.name, resolution, keep_features, source)


def statistics_of_token_shards(shards_dir: str | Path, vae, extractor: FeatureExtractor, *, batch_size: int = 64,
                               limit: int | None = None, keep_features: bool = True,
                               progress: bool = True) -> ReferenceStatistics:
    rank, world = get_rank(), get_world_size()
    from var_train.data import read_manifest

    total = read_manifest(shards_dir).num_records
    total = min(total, limit) if limit else total
    batches = token_shard_batches(shards_dir, vae, batch_size, rank, world, limit)
    local = extract_features(batches, extractor, total=math.ceil(total / world), progress=progress and rank == 0,
                             desc="decode+features")
    features = gather_features(local, collective_device())
    return statistics_from_features(features, extractor.name, vae.resolution, keep_features, str(shards_dir))


# -- loading whatever the user points at -----------------------------------------------------------
def _scalar(value: np.ndarray):
    item = value.item()
    return item.decode() if isinstance(item, bytes) else item


def require_reference(path: str | Path) -> Path:
    """`path` as a reference that exists; checked before the feature extractor is built, so a
    mistyped path is the first thing said, not news after the Inception weights are found."""
    path = Path(path)
    if not path.is_dir() and not path.is_file():
        raise MissingInputError(f"reference not found: {path} (expected a stats .npz from `var-train fid-stats`, "
                                f"an ADM reference batch .npz, or an image folder)")
    return path


def load_reference(path: str | Path, extractor: FeatureExtractor, *, need_features: bool = False,
                   resolution: int | None = None, batch_size: int = 100, max_features: int | None = None,
                   progress: bool = True) -> ReferenceStatistics:
    """Statistics (and, with `need_features`, per-image features for precision/recall) from our
    stats `.npz`, an ADM reference `.npz` (`mu`/`sigma` and/or `arr_0`), or an image folder.
    Features are computed with `extractor` where needed; collective when a process group exists
    (call it on every rank). `max_features` caps the images scored for precision/recall."""
    path = require_reference(path)
    if path.is_dir():
        files = list_image_files(path)
        return statistics_of_images(files, extractor, resolution=resolution or folder_resolution(files),
                                    batch_size=batch_size, progress=progress, source=str(path))
    with np.load(path, allow_pickle=False) as data:
        keys = set(data.files)
        if "format" in keys and _scalar(data["format"]) == STATS_FORMAT:
            count, res = int(_scalar(data["count"])), int(_scalar(data["resolution"]))
            stats = ReferenceStatistics(
                mu=data["mu"].astype(np.float64), sigma=data["sigma"].astype(np.float64),
                count=None if count < 0 else count, extractor=str(_scalar(data["extractor"])),
                resolution=None if res < 0 else res,
                features=data["features"].astype(np.float32) if "features" in keys else None, source=str(path))
            stats.check_extractor(extractor)
            if need_features and stats.features is None:
                raise MismatchError(f"{path} holds no per-image features, which precision/recall need: recompute "
                                    f"it with `var-train fid-stats` (features are kept by default)")
            return stats
        images = data["arr_0"] if "arr_0" in keys else None
        has_moments = {"mu", "sigma"} <= keys
        if images is None and not has_moments:
            raise MismatchError(f"{path} has neither mu/sigma nor arr_0 (keys: {sorted(keys)}): not a reference batch")
        if images is not None and (images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8):
            raise MismatchError(f"{path}: arr_0 must be uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
        use_moments = has_moments and extractor.name in INCEPTION_NAMES
        if use_moments and not need_features:
            return ReferenceStatistics(mu=data["mu"].astype(np.float64), sigma=data["sigma"].astype(np.float64),
                                       count=None if images is None else len(images), extractor=ADM_EXTRACTOR,
                                       resolution=None if images is None else images.shape[1], source=str(path))
        if images is None:
            what = "precision/recall need per-image features" if use_moments else \
                f"its mu/sigma are Inception features, not {extractor.name!r} features"
            raise MismatchError(f"{path} holds only mu/sigma, but {what}; give a reference with images (arr_0) "
                                f"or an image folder")
        if max_features is not None:
            images = images[:max_features]
        stats = statistics_of_images(images, extractor, resolution=images.shape[1], batch_size=batch_size,
                                     progress=progress, source=str(path))
        if use_moments:  # FID against the published moments; the images serve precision/recall only
            stats.mu, stats.sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
            stats.extractor = ADM_EXTRACTOR
        return stats


def compute_fid_stats(*, out: str | Path, images: str | Path | None = None, shards: str | Path | None = None,
                      vae: str | Path | None = None, resolution: int | None = None, limit: int | None = None,
                      feature_extractor: str = "inception", inception_weights: str | Path | None = None,
                      batch_size: int = 100, keep_features: bool = True, device: torch.device | str = "cpu",
                      progress: bool = True) -> tuple[ReferenceStatistics, Path]:
    """`var-train fid-stats`: statistics of an image folder, an ADM `.npz` (arr_0) or token shards
    decoded by `vae`, saved to `out` (by rank 0; collective when a process group exists)."""
    from .features import build_feature_extractor

    if (images is None) == (shards is None):
        raise ValueError("give exactly one of images (folder or ADM .npz) and shards")
    # The inputs first, the feature extractor (the Inception file, say) last: a mistyped path is the
    # first thing said.
    if images is not None and not Path(images).exists():
        raise MissingInputError(f"images not found: {images} (an image folder or an ADM .npz with arr_0)")
    if shards is not None:
        if vae is None:
            raise ValueError("token shards need the VQVAE that decodes them (vae=...)")
        from var_train.data import read_manifest
        from var_train.models.checkpoint_io import load_vae

        decoder = load_vae(vae, patch_nums=list(read_manifest(shards).patch_nums)).to(device).eval()
    extractor = build_feature_extractor(feature_extractor, inception_weights=inception_weights, device=device)
    if shards is not None:
        stats = statistics_of_token_shards(shards, decoder, extractor, batch_size=batch_size, limit=limit,
                                           keep_features=keep_features, progress=progress)
    elif Path(images).is_dir():
        files = list_image_files(images)[:limit]
        stats = statistics_of_images(files, extractor, resolution=resolution or folder_resolution(files),
                                     batch_size=batch_size, keep_features=keep_features, progress=progress,
                                     source=str(images))
    else:
        with np.load(images, allow_pickle=False) as data:
            if "arr_0" not in data.files:
                raise MismatchError(f"{images} has no arr_0 images (keys: {data.files})")
            array = data["arr_0"][:limit]
        if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
            raise MismatchError(f"{images}: arr_0 must be uint8 images (N, H, W, 3), got {array.dtype} {array.shape}")
        stats = statistics_of_images(array, extractor, resolution=array.shape[1], batch_size=batch_size,
                                     keep_features=keep_features, progress=progress, source=str(images))
    path = Path(out)
    if is_main_process():
        save_reference_stats(stats, path)
    barrier()
    return stats, path
