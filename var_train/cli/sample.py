"""Generate images with a trained VAR: PNGs per sample plus a grid.

Examples:
  var-train sample --var var_d16.pth --vae vae_ch160v4096z32.pth --classes 207,360,388 \\
      --per-class 8 --cfg 4.0 --top-k 900 --top-p 0.96 --seed 0 --out samples/
  var-train sample --var demo_out/var.safetensors --vae demo_out/tokenizer/vae.safetensors --out s/   # the demo's

Checkpoints are the reference's .pth or our safetensors. Rows of the grid are classes in order.
"""

from __future__ import annotations

import argparse
import time

import torch

from var_train.command_line import device_name, positive_int

from .sampling_options import add_model_arguments, add_sampling_arguments, sampling_settings

NAME = "sample"
HELP = "generate images (PNGs and a grid) from VAR + VQVAE checkpoints"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--patch-nums", default=None,
                        help="scale sides, e.g. 1,2,3,4 (only for a reference .pth VQVAE with non-default scales; "
                             "default: the VAR's)")
    parser.add_argument("--classes", default=None,
                        help="class ids: '0,3,7', '0-9' or a mix (default: all); 'null' = the unconditional class")
    parser.add_argument("--unconditional", action="store_true",
                        help="sample the null class of classifier-free guidance (same as --classes null)")
    parser.add_argument("--per-class", type=positive_int, default=4, help="images per class (default 4)")
    add_sampling_arguments(parser)
    parser.add_argument("--device", type=device_name, default=None, help="cuda, cpu, ... (default: cuda if available)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--allow-vae-mismatch", action="store_true",
                        help="warn instead of refusing a VAE whose vocabulary or z channels differ from the VAR's, "
                             "or whose codebook differs from the one the VAR was trained with")


def run(args: argparse.Namespace) -> int:
    from var_train.checkpoint import load_var_any
    from var_train.compatibility import check_sampling_inputs, training_vae_of
    from var_train.generate import generate_images, parse_classes, write_samples
    from var_train.models.checkpoint_io import load_vae

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    var = load_var_any(args.var).to(device).eval()
    # one clear error before any work: vocabulary, z channels, and the training VAE's codebook if recorded
    check_sampling_inputs(var.config, args.vae, args.allow_vae_mismatch, trained_with=training_vae_of(args.var))
    patch_nums = [int(p) for p in args.patch_nums.split(",")] if args.patch_nums else list(var.patch_nums)
    vae = load_vae(args.vae, patch_nums=patch_nums).to(device).eval()
    if args.unconditional and (args.classes or "null").strip().lower() != "null":
        from var_train.errors import ConfigError
        raise ConfigError(f"--unconditional samples the null class only: drop --classes {args.classes}")
    if args.unconditional or (args.classes or "").strip().lower() == "null":
        classes = [var.num_classes]  # the null class: guidance has nothing to push against, cfg is moot
    else:
        classes = parse_classes(args.classes, var.num_classes)
    labels = torch.tensor(classes).repeat_interleave(args.per_class)
    started = time.perf_counter()
    images = generate_images(var, vae, labels, sampling_settings(args), batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    grid = write_samples(images, labels, args.out, per_row=args.per_class)
    print(f"wrote {len(images)} images to {args.out} ({len(images) / seconds:.2f} images/s); grid: {grid}")
    return 0
