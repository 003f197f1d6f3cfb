"""Export a training checkpoint's weights for sampling, evaluation or fine-tuning.

Examples:
  var-train export runs/d16 --out runs/d16/export/var.safetensors
  var-train export runs/d16/checkpoints/step-00050000 --out var_d16.pth

The checkpoint may be a step directory, a run's `checkpoints/` directory or a run directory (the
newest complete checkpoint is used). Works offline on one process for every engine (sharded
FSDP2/DDP checkpoints and DeepSpeed ZeRO partitions are consolidated). Output formats:
  safetensors  our format: weights plus the model config in the metadata
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


def run(args: argparse.Namespace) -> int:
    from var_train.checkpoint import export_checkpoint, read_metadata, resolve_checkpoint

    try:
        checkpoint = resolve_checkpoint(args.checkpoint)
        path = export_checkpoint(checkpoint, args.out, args.format)
    except (FileNotFoundError, ValueError) as error:
        print(f"var-train export: error: {error}", file=sys.stderr)
        return 2
    metadata = read_metadata(checkpoint)
    print(f"exported {checkpoint} (step {metadata['step']}, {metadata['engine']}) to {path}")
    return 0
