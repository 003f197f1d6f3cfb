"""Export a training checkpoint's weights for sampling, evaluation or fine-tuning.

Examples:
  var-train export runs/d16 --out runs/d16/export/var.safetensors
  var-train export runs/d16/checkpoints/step-00050000 --out var_d16.pth

The checkpoint may be a step directory, a run's `checkpoints/` directory or a run directory (the
newest complete checkpoint is used). Works offline on one process for every engine (sharded
FSDP2/DDP checkpoints and DeepSpeed ZeRO partitions are consolidated). Output formats:
  safetensors  our format: weights plus the model config in the metadata (and the training VAE's
               codebook fingerprint: `var-train sample` refuses a VAE with another codebook)
  pth          the reference layout: a plain state dict with the released checkpoints' keys
Both load with `var-train sample --var ...` and as `model.init_from` in a recipe.
"""

from __future__ import annotations

import argparse
import sys

NAME = "export"
HELP = "write a checkpoint's consolidated weights as .safetensors or reference-layout .pth"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="step directory, checkpoints/ directory or run directory")
    parser.add_argument("--out", required=True, help="output file (.safetensors or .pth)")
    parser.add_argument("--format", choices=("safetensors", "pth"), default=None,
                        help="output format (default: from the --out suffix)")
    parser.add_argument("--newest-intact", action="store_true",
                        help="if the checkpoint is damaged (var-train verify), export the newest intact one instead "
                             "of refusing")
    parser.add_argument("--ema", action="store_true",
                        help="export the EMA weights (runs trained with optim.ema_decay) instead of the training weights")
    parser.add_argument("--wandb-artifact", action="store_true",
                        help="also attach the exported file to the training run's W&B run as a model artifact "
                             "(offline runs: uploaded by `wandb sync`)")


def run(args: argparse.Namespace) -> int:
    from var_train.checkpoint import checkpoint_to_export, export_checkpoint, read_metadata

    # A missing, damaged or unsafe checkpoint, or a bad format: one line `error: ...`, exit 2.
    checkpoint = checkpoint_to_export(args.checkpoint, newest_intact=args.newest_intact)
    path = export_checkpoint(checkpoint, args.out, args.format, ema=args.ema)
    metadata = read_metadata(checkpoint)
    print(f"exported {checkpoint} (step {metadata['step']}, {metadata['engine']}"
          f"{', EMA weights' if args.ema else ''}) to {path}")
    if args.wandb_artifact:
        _log_artifact(checkpoint, path, metadata, args.ema)
    return 0


def _log_artifact(checkpoint, path, metadata: dict, ema: bool) -> None:
    import re

    from var_train.logging import read_wandb_run, run_dir_of_checkpoint, training_run_logger

    run_dir = run_dir_of_checkpoint(checkpoint)
    if run_dir is None or read_wandb_run(run_dir) is None:
        print(f"var-train export: warning: {checkpoint} is not part of a training run that logged to W&B; "
              f"no artifact written", file=sys.stderr)
        return
    with training_run_logger(run_dir) as logger:
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", f"var-{logger.run_id}" + ("-ema" if ema else ""))
        logger.log_artifact(path, name, "model", {"step": metadata["step"], "engine": metadata["engine"],
                                                  "ema": ema, "file": str(path)})
    print(f"attached {path} to W&B run {logger.run_id} as artifact {name} (type model)")
