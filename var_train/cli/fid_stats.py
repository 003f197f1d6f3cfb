"""Compute and cache reference statistics of real images for FID (and features for precision/recall).

Examples:
  var-train fid-stats --images data/imagenet/val --resolution 256 --out stats/imagenet256_val.npz
  var-train fid-stats --shards shards/train --vae vae.safetensors --limit 50000 --out stats/train_recon.npz
  var-train fid-stats --images data/digits --feature-extractor classifier.safetensors --out stats/digits.npz
  torchrun --nproc_per_node 8 -m var_train.cli fid-stats ...   (each rank scores a slice)

--images: every image under the folder (class subfolders allowed), centre-cropped and resized to
--resolution (ADM's reference-batch preprocessing), or an ADM reference .npz (arr_0 images).
--shards: token shards decoded by the VQVAE (`tokens_to_image`): the best the model can reproduce.
The .npz holds mu, sigma (float64), count, extractor, resolution and, unless --no-features, the
per-image features (float32) that precision/recall need.
"""

from __future__ import annotations

import argparse

from var_train.command_line import device_name, positive_int

NAME = "fid-stats"
HELP = "compute reference statistics (mu, sigma, features) of real images for FID / precision / recall"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="image folder, or an ADM reference batch .npz (arr_0)")
    source.add_argument("--shards", help="token-shard directory (decoded through --vae)")
    parser.add_argument("--vae", default=None, help="VQVAE checkpoint to decode --shards")
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument("--resolution", type=positive_int, default=None,
                        help="image side for --images folders (default: the first image's shorter side)")
    parser.add_argument("--limit", type=positive_int, default=None, help="use at most this many images/records")
    parser.add_argument("--feature-extractor", default="inception",
                        help="'inception' (default) or a classifier .safetensors (e.g. the demo's)")
    parser.add_argument("--inception-weights", default=None,
                        help="path of weights-inception-2015-12-05-6726825d.pth (default: $TORCH_HOME/hub/checkpoints/)")
    parser.add_argument("--batch-size", type=positive_int, default=100, help="images per batch (default 100)")
    parser.add_argument("--no-features", dest="keep_features", action="store_false",
                        help="store only mu/sigma (smaller file; no precision/recall against it)")
    parser.add_argument("--device", type=device_name, default=None, help="cuda, cpu, ... (default: cuda:LOCAL_RANK if available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from var_train.evaluation.reference_stats import compute_fid_stats
    from var_train.parallel import destroy_distributed, init_distributed

    if args.shards and not args.vae:
        from var_train.errors import ConfigError
        raise ConfigError("fid-stats: --shards needs --vae (the VQVAE that decodes the tokens)")
    info = init_distributed()
    try:
        stats, path = compute_fid_stats(
            images=args.images, shards=args.shards, vae=args.vae, out=args.out, resolution=args.resolution,
            limit=args.limit, feature_extractor=args.feature_extractor, inception_weights=args.inception_weights,
            batch_size=args.batch_size, keep_features=args.keep_features, device=args.device or info.device,
            progress=not args.quiet)
    finally:
        destroy_distributed()
    if info.is_main:
        print(f"wrote {path}: {stats.count} images, {stats.num_features} features ({stats.extractor}), "
              f"resolution {stats.resolution}")
    return 0
