"""Tokenize images into WebDataset token shards for VAR training.

Examples:
  var-prep extract /data/imagenet/train --vae vae_ch160v4096z32.pth --out /data/tokens/train --flip
  torchrun --nproc_per_node=8 -m data_prep.cli extract /data/imagenet/train --vae vae.pth --out tokens/
  var-prep extract demo_images/ --vae tokenizer.safetensors --out tokens/   # the tokenizer's own schedule
  var-prep extract /data/in1k --vae vae_ch160v4096z32.pth --out tokens512/ --patch-nums 1,2,3,4,6,9,13,18,24,32

INPUT is an ImageFolder (one subfolder per class), a .csv/.jsonl list of path,label, or WebDataset
tars of images with a `cls` member (a .tar, a folder of them, or a brace pattern).
Images get the reference's evaluation transform (RGB, LANCZOS resize of the shorter side to
1.125 x resolution, centre crop) and are encoded in fp32 on the best device (cuda if available).
Output: OUT/shard-000000.tar ... (one record per image: tokens.npy, tokens_flip.npy with --flip,
cls), OUT/report.json (every skipped input with its reason) and OUT/manifest.json (written last).
Under torchrun/srun each rank extracts its own shards. Run the same command again to resume:
finished shards are skipped, unfinished ones redone.
"""

from __future__ import annotations

import argparse
import os

NAME = "extract"
HELP = "tokenize images (ImageFolder, CSV/JSONL list or WebDataset tars) into token shards"


def _patch_nums(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values) or list(values) != sorted(values):
        raise argparse.ArgumentTypeError(f"patch_nums must be positive and increasing, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="INPUT", help="ImageFolder directory, .csv/.jsonl list, or WebDataset tar(s)")
    parser.add_argument("--vae", required=True, help="VQVAE checkpoint (reference .pth layout or our .safetensors)")
    parser.add_argument("--out", required=True, help="output folder for the shards, report.json and manifest.json")
    parser.add_argument("--resolution", type=int, default=None,
                        help="image side in pixels (default: the VQVAE's, 16 x the last --patch-nums entry: "
                             "256 for the released one)")
    parser.add_argument("--patch-nums", type=_patch_nums, default=None,
                        help="token map side per scale, coarse to fine (default: the schedule the VQVAE file "
                             "records; 1,2,3,4,5,6,8,10,13,16 for the released .pth)")
    parser.add_argument("--flip", action="store_true",
                        help="also store the tokens of the horizontally flipped image (tokens_flip.npy)")
    parser.add_argument("--crops", type=int, default=1,
                        help="1 = centre crop (default); N > 1 = N seeded random crops per image, stored together")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the image order over the shards and of the random crops (default 0)")
    parser.add_argument("--no-shuffle", action="store_true",
                        help="keep the sorted input order in the shards (default: a seeded random order, so "
                             "every shard mixes all classes)")
    parser.add_argument("--shard-size", type=int, default=5000, help="input images per shard (default 5000)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoder batch (default 64)")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader processes decoding images (default: min(8, CPUs))")
    parser.add_argument("--min-size", type=int, default=0,
                        help="skip images whose shorter side is below this many pixels (default 0: keep every "
                             "decodable image, as the reference does)")
    parser.add_argument("--input-format", choices=("auto", "imagefolder", "list", "wds"), default="auto",
                        help="how to read INPUT (default: detected)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="class count when the labels do not reveal it (default: from the input)")
    parser.add_argument("--device", default="auto", help="cuda, cuda:1, cpu, ... (default: auto, each rank its own GPU if there are any; a bare cuda does the same)")
    parser.add_argument("--max-shards", type=int, default=None,
                        help="write at most this many shards per rank, then stop (resume later; for time-limited jobs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from data_prep.extract import ExtractConfig, extract_tokens

    config = ExtractConfig(
        source=args.source, vae=args.vae, out=args.out, resolution=args.resolution, patch_nums=args.patch_nums,
        flip=args.flip, crops=args.crops, seed=args.seed, shuffle=not args.no_shuffle, shard_size=args.shard_size,
        batch_size=args.batch_size,
        num_workers=args.num_workers, min_size=args.min_size, input_format=args.input_format,
        num_classes=args.num_classes, device=args.device, max_shards=args.max_shards, progress=not args.no_progress,
    )
    summary = extract_tokens(config)
    who = f"rank {summary.rank}/{summary.world_size}" if summary.world_size > 1 else "this run"
    print(f"{who}: {summary.shards_done_now} shard(s), {summary.records_written_now} records, "
          f"{summary.skipped_now} skipped, {summary.seconds:.1f} s ({summary.images_per_second:.1f} images/s)")
    if summary.rank != 0:
        return 0
    if summary.complete:
        print(f"complete: {summary.num_records} records in {summary.num_shards} shards at {summary.out}; "
              f"skipped: {summary.skipped_reasons or 'none'} (details in report.json)")
    else:
        print(f"not complete yet: run the same command again to extract the remaining shards of {summary.num_shards}")
    return 0
