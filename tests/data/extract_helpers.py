"""Shared pieces of the extraction tests: fixture VQVAE checkpoints, images on disk, reading shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_prep.extract import ExtractConfig, extract_tokens
from tests.conftest import reference_fixture_dir
from var_train.data.manifest import read_manifest
from var_train.data.records import decode_record
from var_train.data.tar_reader import iter_tar_samples
from var_train.models import VQVAE
from var_train.models.checkpoint_io import save_reference_layout

TINY_FIXTURE = "tiny_l2norm.pt"


def load_fixture(path: Path) -> tuple[dict, VQVAE]:
    fixture = torch.load(path, weights_only=True)
    c = fixture["config"]
    vae = VQVAE(vocab_size=c["vocab_size"], z_channels=c["z_channels"], ch=c["ch"],
                share_quant_resi=c["share_quant_resi"], patch_nums=tuple(c["patch_nums"]))
    vae.load_state_dict(fixture["vae_state_dict"])
    return fixture, vae.eval()


def tiny_vae_checkpoint(tmp_path: Path) -> tuple[Path, VQVAE]:
    """The tiny fixture VQVAE (vocab 64, z 8, ch 32, patch_nums 1,2,3,4) saved in the reference .pth layout."""
    _, vae = load_fixture(reference_fixture_dir() / TINY_FIXTURE)
    path = tmp_path / "tiny_vae.pth"
    if not path.exists():
        save_reference_layout(vae, path)
    return path, vae


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return np.round((images.clamp(-1, 1).add(1).mul(127.5)).permute(0, 2, 3, 1).numpy()).astype(np.uint8)


def write_image_folder(root: Path, arrays: list[np.ndarray], labels: list[int], ext: str = "png") -> list[Path]:
    paths = []
    for i, (array, label) in enumerate(zip(arrays, labels)):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i:03d}.{ext}"
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


def random_images(count: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth random RGB images (noise upsampled), so a VQVAE gives varied tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        small = rng.integers(0, 256, size=(max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
        out.append(np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)))
    return out


def run_extract(source, vae: Path, out: Path, resolution: int = 64, patch_nums=(1, 2, 3, 4), **kw):
    args = dict(shard_size=3, batch_size=2, num_workers=0, min_size=8, progress=False)
    args.update(kw)
    return extract_tokens(ExtractConfig(source=str(source), vae=str(vae), out=str(out), resolution=resolution,
                                        patch_nums=tuple(patch_nums), **args))


def read_records(shards_dir: Path) -> list:
    manifest = read_manifest(shards_dir)
    records = []
    for shard in manifest.shards:
        records += [decode_record(s, manifest.num_tokens) for s in iter_tar_samples(shards_dir / shard.name)]
    return records
