"""The flags shared by the commands that sample a VAR: `sample`, `eval`, `edit` (not a subcommand).

Defaults come from `SamplingSettings` (the paper's settings), so they are written down once.
"""

from __future__ import annotations

import argparse

from var_train.command_line import finite_float, non_negative_int, positive_int, probability
from var_train.models.sampling import PRECISIONS, SamplingSettings

DEFAULTS = SamplingSettings()


VAR_HELP = "VAR: .pth (reference layout), .safetensors, or a training run / checkpoint directory"
VAE_HELP = "VQVAE checkpoint (.pth reference layout or .safetensors)"


def add_model_arguments(parser: argparse.ArgumentParser, var_help: str = VAR_HELP, vae_help: str = VAE_HELP) -> None:
    """--var and --vae, both required."""
    parser.add_argument("--var", required=True, help=var_help)
    parser.add_argument("--vae", required=True, help=vae_help)


def add_sampling_arguments(parser: argparse.ArgumentParser, batch_size: int = 32) -> None:
    parser.add_argument("--cfg", type=finite_float, default=DEFAULTS.cfg,
                        help=f"classifier-free guidance at the last scale (default {DEFAULTS.cfg})")
    parser.add_argument("--top-k", type=non_negative_int, default=DEFAULTS.top_k,
                        help=f"keep the k most likely tokens, 0 = off (default {DEFAULTS.top_k})")
    parser.add_argument("--top-p", type=probability, default=DEFAULTS.top_p,
                        help=f"nucleus probability, 0 = off (default {DEFAULTS.top_p})")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed,
                        help="random seed; sample i's draws follow from (seed, i), so images do not depend on "
                             f"--batch-size or the number of processes (default {DEFAULTS.seed})")
    parser.add_argument("--batch-size", type=positive_int, default=batch_size,
                        help=f"images per sampling batch (default {batch_size})")
    parser.add_argument("--precision", choices=PRECISIONS, default=DEFAULTS.precision,
                        help="token sampling precision; auto = bf16 on GPU and for bf16 weights, fp32 on CPUs "
                             "(bf16 sampling measured no faster there); decoding is always fp32")


def sampling_settings(args: argparse.Namespace) -> SamplingSettings:
    return SamplingSettings(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                            precision=args.precision)
