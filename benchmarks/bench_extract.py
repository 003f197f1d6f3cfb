"""Extraction throughput (`var-prep extract`) and token bytes on disk against the source JPEGs.

Two settings, both on the best local device:
- 64px, tiny VQVAE (vocab 64, z 8, ch 32, patch_nums 1,2,3,4; the demo/test configuration),
  on the scikit-learn digits written as PNGs;
- 256px, real-size VQVAE (ch 160, vocab 4096, z 32, 10 scales; randomly initialised: speed does
  not depend on the weights), on a few digits written as 256px JPEGs (quality 90).
Prints images/s of the whole command (listing, decoding, encoding, writing), images/s of the
encoder alone, and bytes per record against bytes per input JPEG.

  PYTHONPATH=. python benchmarks/bench_extract.py --images-64 256 --images-256 8
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data_prep.demo_data import digit_to_image
from data_prep.extract import ExtractConfig, extract_tokens
from var_train.models import VQVAE
from var_train.models.checkpoint_io import save_model


def write_digits(out: Path, count: int, resolution: int, ext: str) -> list[Path]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    paths = []
    for index in range(count):
        folder = out / str(int(digits.target[index]))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{index:04d}.{ext}"
        image = digit_to_image(digits.images[index], resolution)
        image.save(path, quality=90) if ext == "jpg" else image.save(path)
        paths.append(path)
    return paths


def _bytes_per_record(folder: Path) -> float:
    """Tar bytes a record occupies (512-byte header + padded content per member), without the
    fixed end-of-archive padding of each shard, which small benchmark shards would overstate."""
    from var_train.data.tar_reader import iter_tar_members

    total = records = 0
    for shard in folder.glob("shard-*.tar"):
        for name, content in iter_tar_members(shard):
            total += 512 + -(-len(content) // 512) * 512
            records += name.endswith(".cls")
    return total / records


def encoder_rate(vae: VQVAE, resolution: int, batch: int, device: torch.device) -> float:
    images = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    vae.image_to_tokens(images[:1])  # warm-up
    started = time.perf_counter()
    vae.image_to_tokens(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch / (time.perf_counter() - started)


def run_case(name: str, vae: VQVAE, resolution: int, count: int, ext: str, batch_size: int, workers: int,
             device: torch.device) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = write_digits(tmp / "images", count, resolution, ext)
        checkpoint = save_model(vae, tmp / "vae.safetensors")
        summary = extract_tokens(ExtractConfig(
            source=str(tmp / "images"), vae=str(checkpoint), out=str(tmp / "tokens"), resolution=resolution,
            patch_nums=tuple(vae.patch_nums), batch_size=batch_size, num_workers=workers, shard_size=1000,
            progress=False, device=str(device)))
        for flip in (False, True):
            if flip:
                summary = extract_tokens(ExtractConfig(
                    source=str(tmp / "images"), vae=str(checkpoint), out=str(tmp / "tokens_flip"),
                    resolution=resolution, patch_nums=tuple(vae.patch_nums), batch_size=batch_size, flip=True,
                    num_workers=workers, shard_size=1000, progress=False, device=str(device)))
            folder = tmp / ("tokens_flip" if flip else "tokens")
            record_bytes = _bytes_per_record(folder)
            input_bytes = np.mean([p.stat().st_size for p in inputs])
            print(f"{name}{' --flip' if flip else ''}: {summary.num_records} images in {summary.seconds:.1f} s "
                  f"= {summary.images_per_second:.3g} images/s (whole command, {workers} decode workers); "
                  f"{record_bytes:.0f} bytes/record in the shards vs {input_bytes:.0f} bytes per input {ext}")
        print(f"{name}: encoder alone {encoder_rate(vae, resolution, batch_size, device):.3g} images/s "
              f"(batch {batch_size}, fp32, {device})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images-64", type=int, default=256)
    parser.add_argument("--images-256", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    torch.manual_seed(0)
    if args.images_64:
        tiny = VQVAE(vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4)).eval()
        run_case("64px tiny VQVAE", tiny, 64, args.images_64, "png", 64, args.workers, device)
    if args.images_256:
        real = VQVAE(vocab_size=4096, z_channels=32, ch=160).eval()
        run_case("256px ch160 VQVAE", real, 256, args.images_256, "jpg", 4, args.workers, device)


if __name__ == "__main__":
    main()
