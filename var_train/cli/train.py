"""Train VAR from token shards with a recipe and dotted overrides.

  var-train train --recipe recipes/d16.yaml data.train_shards=/data/in1k-tokens data.vae=vae_ch160v4096z32.pth
  torchrun --nproc_per_node 8 -m var_train.cli train --recipe recipes/d16.yaml ...
  accelerate launch --num_processes 8 -m var_train.cli train --recipe recipes/d16.yaml ...
  srun var-train train --recipe recipes/d30.yaml parallel.activation_checkpointing=true ...
  var-train train --recipe recipes/d30.yaml --dry-run --world-size 64

Overrides are `section.key=value` (values parsed as YAML); unknown keys are rejected with the
valid ones. The run directory (run.output_dir) receives config.yaml, metrics.jsonl, W&B files
and checkpoints/; a restart with the same output_dir resumes from the newest checkpoint.

Exit codes: 0 done; 42 preempted (SIGTERM/SIGUSR1 -> checkpoint -> exit: requeue the job);
130 Ctrl-C (checkpoint -> exit; a second Ctrl-C quits without saving); 43 stopped after too many consecutive non-finite steps (checkpoint saved); 2 a user error (bad config,
missing or mismatched files, a checkpoint of another model, a full disk): one line `error: ...`.
"""

from __future__ import annotations

import argparse
import os

from var_train.command_line import positive_int

NAME = "train"
HELP = "train VAR from token shards (FSDP2, DeepSpeed, DDP or Accelerate)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="YAML recipe, e.g. recipes/d16.yaml")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="recipe overrides")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config, parameters, FLOPs, steps and memory per GPU, then exit")
    parser.add_argument("--world-size", type=positive_int, default=None,
                        help="with --dry-run: plan for this many GPUs (default: WORLD_SIZE or 1)")


def run(args: argparse.Namespace) -> int:
    from var_train.config import ConfigError, load_config

    cfg = load_config(args.recipe, args.overrides)  # ConfigError -> one line `error: ...`, exit 2 (command_line.py)
    if args.dry_run:
        from var_train.dry_run import describe
        from var_train.parallel import grad_accumulation_steps

        world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        print(describe(cfg, world_size))
        grad_accumulation_steps(cfg.optim, world_size)  # a batch that does not split: the plan, then error, exit 2
        return 0
    missing = [name for name, value in (("data.train_shards", cfg.data.train_shards), ("data.vae", cfg.data.vae)) if not value]
    if missing:
        raise ConfigError(f"set {' and '.join(missing)} (in the recipe or as overrides)")
    from var_train.train import train

    return train(cfg).exit_code
