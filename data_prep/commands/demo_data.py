"""Write a small real image set for trying var_train without downloading anything.

The 1,797 handwritten digits (8x8 scans, 10 classes) that ship with scikit-learn, upscaled to
--resolution (default 64, which matches --patch-nums 1,2,3,4) and written as an ImageFolder:
OUT/0/*.png ... OUT/9/*.png. Next step: `var-prep extract OUT --vae VAE --out SHARDS
--resolution 64 --patch-nums 1,2,3,4`.
"""

from __future__ import annotations

import argparse

NAME = "demo-data"
HELP = "write scikit-learn's 1,797 handwritten digits as a 10-class ImageFolder (no download)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (class folders 0..9 are created in it)")
    parser.add_argument("--resolution", type=int, default=64, help="side of the written images in pixels (default: 64)")
    parser.add_argument("--limit", type=int, default=None, help="write only the first N digits (default: all 1,797)")


def run(args: argparse.Namespace) -> int:
    from data_prep.demo_data import write_demo_data

    summary = write_demo_data(args.out, resolution=args.resolution, limit=args.limit)
    print(f"wrote {summary.num_images} images in {summary.num_classes} classes at "
          f"{summary.resolution}x{summary.resolution} to {summary.out}")
    return 0
