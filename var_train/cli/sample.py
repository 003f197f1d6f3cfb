"""Generate images with a trained VAR: PNGs per sample plus a grid.

Examples:
  var-train sample --var var_d16.pth --vae vae_ch160v4096z32.pth --classes 207,360,388 \\
      --per-class 8 --cfg 4.0 --top-k 900 --top-p 0.96 --seed 0 --out samples/
  var-train sample --var runs/demo/export/var.safetensors --vae runs/demo/tokenizer/vae.safetensors --out s/

Checkpoints are the reference's .pth or our safetensors. Rows of the grid are classes in order.
"""

from __future__ import annotations

import argparse
import time

import torch

NAME = "sample"
HELP = "generate images (PNGs and a grid) from VAR + VQVAE checkpoints"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--var", required=True, help="VAR checkpoint (.pth reference layout or .safetensors)")
    parser.add_argument("--vae", required=True, help="VQVAE checkpoint (.pth reference layout or .safetensors)")
    parser.add_argument("--patch-nums", default=None,
                        help="scale sides, e.g. 1,2,3,4 (only for a reference .pth VQVAE with non-default scales; "
                             "default: the VAR's)")
    parser.add_argument("--classes", default=None, help="class ids: '0,3,7', '0-9' or a mix (default: all)")
    parser.add_argument("--per-class", type=int, default=4, help="images per class (default 4)")
    parser.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance at the last scale (default 1.5)")
    parser.add_argument("--top-k", type=int, default=900, help="keep the k most likely tokens, 0 = off (default 900)")
    parser.add_argument("--top-p", type=float, default=0.96, help="nucleus probability, 0 = off (default 0.96)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward batch (default 32)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="auto = bf16 on GPU, fp32 on CPU")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    parser.add_argument("--out", required=True, help="output folder")


def run(args: argparse.Namespace) -> int:
    from var_train.generate import generate_images, parse_classes, write_samples
    from var_train.models.checkpoint_io import load_vae, load_var

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    var = load_var(args.var).to(device).eval()
    patch_nums = [int(p) for p in args.patch_nums.split(",")] if args.patch_nums else list(var.patch_nums)
    vae = load_vae(args.vae, patch_nums=patch_nums).to(device).eval()
    classes = parse_classes(args.classes, var.num_classes)
    labels = torch.tensor(classes).repeat_interleave(args.per_class)
    started = time.perf_counter()
    images = generate_images(var, vae, labels, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                             seed=args.seed, batch_size=args.batch_size, precision=args.precision)
    seconds = time.perf_counter() - started
    grid = write_samples(images, labels, args.out, per_row=args.per_class)
    print(f"wrote {len(images)} images to {args.out} ({len(images) / seconds:.2f} images/s); grid: {grid}")
    return 0
