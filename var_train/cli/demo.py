"""Run the whole pipeline on the embedded demo data (scikit-learn's digits), on this machine's CPU.

  var-train demo --out demo_out

Stages: demo images -> tokenizer training -> token shards -> 2-process FSDP2 training of a small
VAR -> sample grid -> FID/IS/precision/recall with a digits classifier's features and the
per-class accuracy of the generated digits. 5 to 8 minutes on 2 quiet CPU cores; an interrupted demo
resumes where it stopped. Results: <out>/summary.json, <out>/samples/grid.png,
<out>/train/metrics.jsonl (W&B offline files in <out>/train/wandb).
"""

from __future__ import annotations

import argparse

from var_train.command_line import positive_int

NAME = "demo"
HELP = "the end-to-end demo on scikit-learn's digits (5 to 8 minutes on a 2-core CPU)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    parser.add_argument("--nproc", type=positive_int, default=2, help="training processes (default 2)")
    parser.add_argument("--tokenizer-minutes", type=float, default=2.0,
                        help="time budget of tokenizer training (default 2.0)")
    parser.add_argument("--samples-per-class", type=positive_int, default=20, help="evaluation samples per class (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="VAR training and sampling (auto: bf16 training on CPUs with native bf16, fp32 sampling "
                             "on CPUs; see BENCHMARKS.md); the tokenizer, extraction and features stay fp32")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="overrides of recipes/demo.yaml for the VAR training, e.g. optim.epochs=10")


def run(args: argparse.Namespace) -> int:
    from .demo_pipeline import DemoConfig, run_demo

    run_demo(DemoConfig(out=args.out, nproc=args.nproc, tokenizer_minutes=args.tokenizer_minutes,
                        samples_per_class=args.samples_per_class, seed=args.seed, train_overrides=args.overrides,
                        precision=args.precision))
    return 0
