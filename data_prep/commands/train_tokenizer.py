"""Train VAR's multi-scale VQVAE tokenizer on an image folder, from scratch or fine-tuning.

A thin command over var_train.tokenizer (the tokenizer trainer, on the VAR trainer's machinery).
Images are read as an ImageFolder (<data_dir>/<class>/<image>) with the reference preprocessing
(shorter side to round(1.125 R) with LANCZOS, random R x R crop, [-1, 1]); R = the VQVAE's
downsampling (16 with the released --ch-mult 1,1,2,2,4) x the last patch_num. A held-out split
(--val-fraction) is scored before and after training. The LR warms up over --warmup-steps, holds,
then decays linearly to --wpe x --lr at --max-steps.

Outputs in --output-dir:
  checkpoints/step-00000100/   the VQVAE and its optimizer (engine state), RNG, trainer state
                               (discriminator, dead-code counters, clock); a rerun resumes the newest
  metrics.jsonl                per window: every loss term (train/reconstruction_l2, train/vq_loss,
                               train/lpips, train/generator_adv, train/discriminator_loss, train/loss),
                               train/lr, train/grad_norm, codebook usage and perplexity per scale,
                               train/dead_codes_restarted, perf/images_per_s; val/mse before and after
  wandb/                       the same metrics for W&B (offline unless --wandb-mode online)
  vqvae.safetensors            the final model (load with var_train.models.checkpoint_io.load_vae)
  vqvae.pth                    the same weights in the released checkpoints' layout

Preemption: SIGTERM or SIGUSR1 -> checkpoint at the next step -> exit 42; run the same command
again to continue. Distributed: start one process per device with torchrun or srun (DDP; gloo on
CPU, nccl on GPU); --batch-size is per process.

Examples:
  var-prep train-tokenizer --data-dir demo/images --output-dir runs/tok-demo --preset demo
  torchrun --nproc-per-node 8 -m data_prep.cli train-tokenizer --data-dir /data/imagenet/train \\
      --output-dir runs/tok-ft --init-from vae_ch160v4096z32.pth --lr 2e-5 --batch-size 8
"""

from __future__ import annotations

import argparse
import re

from var_train.command_line import finite_float
from var_train.errors import ConfigError
from var_train.parallel.distributed import launcher_ranks
from var_train.tokenizer import TokenizerTrainingConfig, train_tokenizer

NAME = "train-tokenizer"
HELP = "Train or fine-tune the multi-scale VQVAE tokenizer on an image folder."

# A tokenizer that learns in minutes on a CPU: 64px digits, 4 scales (1,2,3,4), ch 32. Measured
# (BENCHMARKS.md): held-out MSE 0.66 -> 0.025 in 10 minutes on one core of the 2-core dev machine.
PRESETS = {
    "demo": dict(vocab_size=512, z_channels=16, ch=32, patch_nums=(1, 2, 3, 4), batch_size=8,
                 lr=3e-4, dead_code_steps=20, max_minutes=10.0, max_steps=2000, checkpoint_every=100),
    "reference": dict(vocab_size=4096, z_channels=32, ch=160, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16)),
}


def _patch_nums(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"patch_nums must be comma-separated integers, got {text!r}")
    if not values or any(v < 1 for v in values) or list(values) != sorted(set(values)):
        raise argparse.ArgumentTypeError(f"patch_nums must be increasing positive integers, got {text!r}")
    return values


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TokenizerTrainingConfig(data_dir="", output_dir="")
    io = parser.add_argument_group("data and outputs")
    io.add_argument("--data-dir", required=True, help="ImageFolder root: <data-dir>/<class>/<image>")
    io.add_argument("--output-dir", required=True, help="run directory (checkpoints, metrics, final model)")
    io.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="start from a named configuration (explicit flags still win): "
                         + "; ".join(f"{k}: {v}" for k, v in PRESETS.items()))
    io.add_argument("--val-fraction", type=finite_float, default=None, help=f"held-out share of the images (default {d.val_fraction})")
    io.add_argument("--val-max-images", type=int, default=None, help=f"cap on held-out images (default {d.val_max_images})")
    io.add_argument("--hflip", action="store_true", default=None, help="random horizontal flips in training")
    io.add_argument("--num-workers", type=int, default=None, help=f"data loader workers per process (default {d.num_workers})")
    io.add_argument("--no-resume", dest="resume", action="store_false", default=None,
                    help="start fresh even if --output-dir has checkpoints (default: resume from the newest)")
    io.add_argument("--no-export-reference", dest="export_reference", action="store_false", default=None,
                    help="do not write vqvae.pth in the reference layout at the end")

    model = parser.add_argument_group("model (ignored with --init-from, which brings its own)")
    model.add_argument("--init-from", default=None, help="fine-tune this VQVAE (.pth reference layout or our .safetensors)")
    model.add_argument("--vocab-size", type=int, default=None, help=f"codebook entries (default {d.vocab_size})")
    model.add_argument("--z-channels", type=int, default=None, help=f"code dimension (default {d.z_channels})")
    model.add_argument("--ch", type=int, default=None, help=f"base channels of encoder/decoder, a multiple of 32 (default {d.ch})")
    model.add_argument("--share-quant-resi", type=int, default=None, help=f"number of phi convs (default {d.share_quant_resi})")
    model.add_argument("--patch-nums", type=_patch_nums, default=None,
                       help="token-map sides per scale, e.g. 1,2,3,4 (resolution = downsampling x the last); "
                            "default the released 1,2,3,4,5,6,8,10,13,16")
    model.add_argument("--beta", type=finite_float, default=None, help=f"commitment weight (default {d.beta})")
    model.add_argument("--ch-mult", type=_int_list, default=None,
                       help="channel multiplier per level, e.g. 1,1,2 (2^(levels-1)x downsampling; "
                            "default the released 1,1,2,2,4: 16x)")
    model.add_argument("--encoder-blocks", type=int, default=None, help="res-blocks per encoder level (default 2)")
    model.add_argument("--decoder-blocks", type=int, default=None, help="res-blocks per decoder level (default 3)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--batch-size", type=int, default=None, help=f"images per process per step (default {d.batch_size})")
    optim.add_argument("--lr", type=finite_float, default=None, help=f"AdamW learning rate (default {d.lr})")
    optim.add_argument("--weight-decay", type=finite_float, default=None, help=f"(default {d.weight_decay})")
    optim.add_argument("--max-steps", type=int, default=None, help=f"total optimizer steps (default {d.max_steps})")
    optim.add_argument("--max-minutes", type=finite_float, default=None, help="stop after this much training time (resumable)")
    optim.add_argument("--min-steps", type=int, default=None,
                       help="with --max-minutes: train at least this many steps, however slow the machine (default 0)")
    optim.add_argument("--warmup-steps", type=int, default=None, help=f"linear LR warmup steps (default {d.warmup_steps})")
    optim.add_argument("--hold-fraction", type=finite_float, default=None,
                       help=f"share of the post-warmup steps held at the peak LR (default {d.hold_fraction})")
    optim.add_argument("--wpe", type=finite_float, default=None,
                       help=f"final LR as a fraction of --lr, reached at --max-steps; 1 = constant (default {d.wpe})")
    optim.add_argument("--clip-grad-norm", type=finite_float, default=None,
                       help=f"clip the gradient norm to this, 0 = no clipping (default {d.clip_grad_norm})")
    optim.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="bf16 autocast (GPU) or fp32 (default)")
    optim.add_argument("--seed", type=int, default=None, help=f"(default {d.seed})")

    losses = parser.add_argument_group("losses")
    losses.add_argument("--l2-weight", type=finite_float, default=None, help=f"pixel MSE weight (default {d.l2_weight})")
    losses.add_argument("--l1-weight", type=finite_float, default=None, help=f"pixel L1 weight (default {d.l1_weight})")
    losses.add_argument("--vq-weight", type=finite_float, default=None, help=f"codebook + commitment weight (default {d.vq_weight})")
    losses.add_argument("--lpips-weight", type=finite_float, default=None, help="LPIPS weight (default 0; needs the two files below)")
    losses.add_argument("--lpips-weights", default=None, help="local LPIPS linear heads (the lpips package's weights/v0.1/vgg.pth)")
    losses.add_argument("--vgg16-weights", default=None, help="local torchvision VGG16 state dict (vgg16-397923af.pth)")
    losses.add_argument("--disc-weight", type=finite_float, default=None,
                        help="weight of the PatchGAN hinge loss (default 0 = no discriminator; the VAR paper used 0.5)")
    losses.add_argument("--disc-start", type=int, default=None, help="step at which the adversarial term starts (default 0)")
    losses.add_argument("--dead-code-steps", type=int, default=None,
                        help=f"restart codes unused for this many steps, 0 = never (default {d.dead_code_steps})")

    book = parser.add_argument_group("logging and checkpoints")
    book.add_argument("--log-every", type=int, default=None, help=f"steps per metrics window (default {d.log_every})")
    book.add_argument("--checkpoint-every", type=int, default=None, help=f"(default {d.checkpoint_every})")
    book.add_argument("--keep-last", type=int, default=None, help=f"checkpoints kept, 0 = all (default {d.keep_last})")
    book.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                      help="no progress bar: a console line per --log-every window instead")
    book.add_argument("--wandb-mode", choices=["offline", "online", "disabled"], default=None,
                      help=f"W&B logging (default {d.wandb_mode}: files under --output-dir/wandb, nothing sent)")
    book.add_argument("--wandb-project", default=None, help=f"(default {d.wandb_project})")
    book.add_argument("--wandb-run-name", default=None, help="(default: W&B's own)")


def config_from_args(args: argparse.Namespace) -> TokenizerTrainingConfig:
    fields = dict(PRESETS[args.preset]) if args.preset else {}
    for name in TokenizerTrainingConfig.__dataclass_fields__:
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    try:
        return TokenizerTrainingConfig(**fields)
    except ConfigError as error:  # the config speaks of its fields; the user typed flags
        raise ConfigError(_in_flag_names(str(error), args)) from None


def _in_flag_names(message: str, args: argparse.Namespace) -> str:
    """`batch_size must be >= 1` -> `--batch-size must be >= 1`, for every field that is a flag here."""
    flags = {name for name in TokenizerTrainingConfig.__dataclass_fields__ if name in vars(args)}
    return re.sub(r"(?<![-\w])(\w+)\b", lambda m: "--" + m[1].replace("_", "-") if m[1] in flags else m[1], message)


def run(args: argparse.Namespace) -> int:
    """0 when done; 42 when preempted (checkpoint saved: rerun to resume); 43 after too many
    non-finite steps. Bad flags and missing or mismatched files raise UserError (exit 2)."""
    result = train_tokenizer(config_from_args(args))
    if result.exit_code != 0 or launcher_ranks()[0] != 0:
        return result.exit_code
    if result.val_after:
        print(f"step {result.step}: held-out MSE {result.val_before.get('val/mse', float('nan')):.4f} -> "
              f"{result.val_after['val/mse']:.4f}; codebook usage per scale "
              + ", ".join(f"{k.removeprefix('val/codebook_usage_')}={v:.3f}" for k, v in result.val_after.items()
                          if k.startswith("val/codebook_usage_")))
    print(f"model: {result.model_path}" + (f"; reference layout: {result.reference_path}" if result.reference_path else ""))
    return 0
