"""Scaling laws: plan and submit the paper's sweep, fit and plot the power laws, or run a small one here.

  var-train scaling plan --recipe recipes/d16.yaml --world-size 64 data.train_shards=/data/in1k-tokens \\
      data.val_shards=/data/in1k-val-tokens data.vae=/ckpt/vae_ch160v4096z32.pth          # the table
  var-train scaling plan ... --print      # the sbatch command of every job
  var-train scaling plan ... --submit     # submit them (slurm/train.sbatch, one W&B group per sweep)
  var-train scaling plan ... --json       # for tools
  var-train scaling fit runs/scaling/d* --out scaling_fit      # fit.json, fit.md, PNG plots
  var-train scaling demo --out scaling_demo                    # 5 sizes on the digits, ~12 min on 2 cores

plan: one job per depth (default the paper's 12: 6 ... 30), hyperparameters from the size-rule
table (var_train/models/size_rules.py), micro-batch x accumulation x world size = global batch
exactly, memory per GPU within --gpu-memory by the dry run's estimate (activation checkpointing
only when needed), nodes, steps and PFLOP-days. Overrides after the options (after --depths too) go
to every job (they win over the table). Exit 2 when a job cannot be made valid (the table says why).

fit: reads each run directory's summary.json (and metrics.jsonl's validation history, for the
compute frontier); a directory of run directories is expanded. Unfinished runs are fitted and
marked; --finished-only leaves them out. Runs without a usable summary are listed, not fitted.
Fewer than 3 model sizes: the fits are made but come with a warning (2 points always lie on a line;
the compute frontier of one model is its learning curve), and a missing fit says why.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from var_train.command_line import positive_int

NAME = "scaling"
HELP = "plan/submit the scaling sweep, fit and plot the power laws, or run a small sweep on the digits"
DEMO_DESCRIPTION = """A real scaling-law sweep on this CPU, from scikit-learn's digits (about 12 minutes on 2 cores).

The digits (16 px, 1 image in 7 of each class held out) -> a small VQVAE (or --vae) -> token
shards (--crops random crops per training image, centre crops for validation) -> one VAR per
--depths (width 32 x depth), all trained on the same data for the same epochs and validated 8
times -> the fit of `var-train scaling fit` in OUT/fit (fit.json, fit.md, PNG plots). A stage
whose output exists is skipped: run the same command again to continue an interrupted sweep.

  var-train scaling demo --out scaling_demo
  var-train scaling demo --depths 1 2 3 --epochs 4 logging.wandb_mode=disabled   # overrides: every model
"""


class _OverridesInOrder(argparse.Action):
    """The positional section.key=value overrides, added after those an option of several values
    passed on (see _ValuesThenOverrides), so they keep the order they were typed in."""

    def __call__(self, parser, namespace, values, option_string=None):
        _add_overrides(namespace, values)


class _ValuesThenOverrides(argparse.Action):
    """An option of one or more values (--depths 6 16 30) that passes the key=value tokens typed
    after it on to the overrides: nargs="+" takes every token up to the next option, so without
    this `--depths 6 16 data.vae=v.pth` would fail as "invalid int value: 'data.vae=v.pth'"."""

    def __init__(self, option_strings, dest, value_type=positive_int, **kwargs):
        self.value_type = value_type  # not argparse's `type`: that would convert the overrides too
        super().__init__(option_strings, dest, nargs="+", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        overrides = [text for text in values if "=" in text]
        own = [text for text in values if "=" not in text]
        if not own:
            parser.error(f"argument {option_string}: expected at least one value before {overrides[0]}")
        converted = []
        for text in own:
            try:
                converted.append(self.value_type(text))
            except argparse.ArgumentTypeError as error:
                parser.error(f"argument {option_string}: {error}")
            except ValueError:
                parser.error(f"argument {option_string}: invalid {self.value_type.__name__} value: {text!r}")
        setattr(namespace, self.dest, converted)
        _add_overrides(namespace, overrides)


def _add_overrides(namespace: argparse.Namespace, overrides) -> None:
    # a new list each time: argparse puts the default list itself into the namespace
    namespace.overrides = [*(getattr(namespace, "overrides", None) or []), *overrides]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="scaling_command", metavar="ACTION", required=True)

    plan = sub.add_parser("plan", help="one valid job per depth for a cluster of --world-size GPUs",
                          description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    plan.add_argument("--recipe", required=True, help="base recipe: data, engine, checkpoint and logging settings")
    plan.add_argument("--world-size", type=int, required=True, help="GPUs per job")
    plan.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    plan.add_argument("--headroom", type=float, default=0.1,
                      help="fraction of --gpu-memory kept free for what the estimate leaves out (default 0.1)")
    plan.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    plan.add_argument("--depths", action=_ValuesThenOverrides, default=None, metavar="DEPTH",
                      help="model depths (default: 6 8 10 12 14 16 18 20 22 24 27 30); key=value after them "
                           "are overrides")
    plan.add_argument("--runs", default="runs/scaling", help="parent of the run directories RUNS/d<depth>")
    plan.add_argument("--group", default=None, help="W&B group of the sweep (default: the name of --runs)")
    plan.add_argument("--dataset-images", type=int, default=None,
                      help="images per epoch (default: data.train_shards' manifest, else ImageNet-1k's 1,281,167)")
    plan.add_argument("--tflops-per-gpu", type=float, default=78.0,
                      help="sustained TFLOP/s per GPU for the days column (default 78, the paper's A100 runs)")
    action = plan.add_mutually_exclusive_group()
    action.add_argument("--submit", action="store_true", help="submit every job with sbatch slurm/train.sbatch")
    action.add_argument("--print", dest="print_commands", action="store_true", help="print the sbatch commands")
    action.add_argument("--json", action="store_true", help="the plan as JSON")
    plan.add_argument("--sbatch", default="sbatch", help="sbatch executable (default sbatch)")
    plan.add_argument("overrides", nargs="*", action=_OverridesInOrder, default=[], metavar="section.key=value",
                      help="overrides for every job")

    fit = sub.add_parser("fit", help="fit L = (beta X)^alpha to finished runs; write fit.json, fit.md, plots",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fit.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                     help="run directories (with summary.json), or folders of them")
    fit.add_argument("--out", required=True, help="output folder")
    fit.add_argument("--finished-only", action="store_true", help="leave out runs that have not finished")
    fit.add_argument("--confidence", type=float, default=0.95, help="level of alpha's interval (default 0.95)")
    fit.add_argument("--no-plots", action="store_true", help="write fit.json and fit.md only")
    fit.add_argument("--wandb-project", default=None, help="log the table and plots to this W&B project")
    fit.add_argument("--wandb-mode", default="offline", choices=("offline", "online"),
                     help="W&B mode (default offline)")
    fit.add_argument("--wandb-group", default=None, help="W&B group of the fit run (default none)")

    demo = sub.add_parser("demo", help="a mini sweep on scikit-learn's digits, then fit and plot (~12 min, 2 cores)",
                          description=DEMO_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--out", default="scaling_demo", help="output folder (default scaling_demo)")
    demo.add_argument("--depths", action=_ValuesThenOverrides, default=None, metavar="DEPTH",
                      help="model depths (default 1 2 3 4 5); key=value after them are overrides")
    demo.add_argument("--epochs", type=float, default=None, help="epochs of every model (default 10)")
    demo.add_argument("--crops", type=int, default=None, help="random crops per training image (default 8)")
    demo.add_argument("--nproc", type=int, default=2, help="training processes per model (default 2)")
    demo.add_argument("--vae", default=None,
                      help="reuse this tokenizer (.safetensors) instead of training one (default: train one)")
    demo.add_argument("--tokenizer-minutes", type=float, default=2.0,
                      help="time budget of the tokenizer's training, in minutes (default 2)")
    demo.add_argument("--seed", type=int, default=0,
                      help="seed of the tokenizer, the random crops and every model (default 0)")
    demo.add_argument("overrides", nargs="*", action=_OverridesInOrder, default=[], metavar="section.key=value",
                      help="overrides for every model")


def run(args: argparse.Namespace) -> int:
    return {"plan": _plan, "fit": _fit, "demo": _demo}[args.scaling_command](args)


def _plan(args: argparse.Namespace) -> int:
    import subprocess

    from var_train.config import load_config
    from var_train.errors import UserError
    from var_train.models import PAPER_DEPTHS
    from var_train.scaling.plan import format_table, plan_sweep, sbatch_lines

    if args.world_size < 1:
        raise UserError(f"--world-size must be at least 1, got {args.world_size}")
    group = args.group or Path(args.runs).name
    if args.submit:  # a wrong file or a model unlike the data is the first thing to hear
        _check_inputs_before_submitting(args.recipe, args.overrides)
    jobs = plan_sweep(args.recipe, args.world_size, depths=args.depths or PAPER_DEPTHS,
                      gpu_memory_gib=args.gpu_memory, headroom=args.headroom, gpus_per_node=args.gpus_per_node,
                      runs=args.runs, wandb_group=group, overrides=args.overrides,
                      dataset_images=args.dataset_images, tflops_per_gpu=args.tflops_per_gpu)
    root = Path(__file__).resolve().parents[2]
    invalid = [job for job in jobs if not job.valid]
    if args.json:
        print(json.dumps([{**job.as_dict(), "sbatch": job.sbatch_command(args.recipe, root, args.sbatch)}
                          for job in jobs], indent=2))
    elif args.print_commands:
        print("\n".join(sbatch_lines(jobs, args.recipe, root, args.sbatch)))
        missing = _missing_inputs(load_config(args.recipe, args.overrides))
        if missing:  # the lines are for copying into a shell: say now that they would fail at start
            print(f"warning: {' and '.join(missing)} not set: these jobs would stop at start; add "
                  f"{' '.join(f'{name}=...' for name in missing)} to the command", file=sys.stderr)
    else:
        print(format_table(jobs, args.tflops_per_gpu))
    if invalid:
        print(f"error: {len(invalid)} of {len(jobs)} jobs cannot run as planned: "
              + "; ".join(f"d{job.depth}: {job.problem}" for job in invalid), file=sys.stderr)
        return 2
    if args.submit:
        print(format_table(jobs, args.tflops_per_gpu))
        for job in jobs:
            command = job.sbatch_command(args.recipe, root, args.sbatch)
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                print(f"error: sbatch failed for d{job.depth} ({result.returncode}): {result.stderr.strip()}",
                      file=sys.stderr)
                return 1
            print(f"d{job.depth}: {result.stdout.strip()}")
    return 0


def _missing_inputs(cfg) -> list[str]:
    return [name for name, value in (("data.train_shards", cfg.data.train_shards), ("data.vae", cfg.data.vae))
            if not value]


def _check_inputs_before_submitting(recipe: str, overrides: list[str]) -> None:
    """The start-up checks of training (files exist, VAE, shards and model agree), here, once: a
    mistake is one line now, not a dozen jobs that wait in the queue and then fail."""
    from var_train.compatibility import check_training_inputs
    from var_train.config import ConfigError, load_config

    cfg = load_config(recipe, overrides)
    missing = _missing_inputs(cfg)
    if missing:
        raise ConfigError(f"set {' and '.join(missing)} before --submit (in the recipe or as overrides)")
    check_training_inputs(cfg.model, cfg.data, warn=lambda line: print(f"warning: {line}", file=sys.stderr))


def _fit(args: argparse.Namespace) -> int:
    from var_train.scaling.report import write_report

    report = write_report(args.run_dirs, args.out, finished_only=args.finished_only, confidence=args.confidence,
                          plots=not args.no_plots, wandb_project=args.wandb_project, wandb_mode=args.wandb_mode,
                          wandb_group=args.wandb_group)
    print(report.files["fit.md"].read_text(), end="")
    for run in report.left_out:
        print(f"left out {run.path}: {run.problem}", file=sys.stderr)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in report.files.values()))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .scaling_demo import ScalingDemoConfig, run_scaling_demo

    defaults = ScalingDemoConfig()
    run_scaling_demo(ScalingDemoConfig(
        out=args.out, depths=tuple(args.depths or defaults.depths), epochs=args.epochs or defaults.epochs,
        crops=args.crops or defaults.crops, nproc=args.nproc, vae=args.vae, tokenizer_minutes=args.tokenizer_minutes,
        seed=args.seed, train_overrides=list(args.overrides)))
    return 0
