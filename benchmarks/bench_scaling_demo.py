"""The scaling-law demo as a benchmark: run `var-train scaling demo` and print its fitted exponents,
r and stage times as a BENCHMARKS.md table, with the machine's load before and after.

    python benchmarks/bench_scaling_demo.py --out /tmp/scaling_demo      # ~15 min on 2 cores
    python benchmarks/bench_scaling_demo.py --out /tmp/scaling_demo --depths 1 2 3 --epochs 2   # quick

Run it once on a quiet machine: the numbers are what one sweep gave, noise included.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time

from var_train.cli.scaling_demo import ScalingDemoConfig, run_scaling_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/scaling_demo")
    parser.add_argument("--depths", type=int, nargs="+", default=None)
    parser.add_argument("--epochs", type=float, default=None)
    parser.add_argument("--copy-plot", default=None, help="copy the losses figure (scaling_losses.png) here")
    args = parser.parse_args()
    defaults = ScalingDemoConfig()
    load_before, started = os.getloadavg(), time.perf_counter()
    summary = run_scaling_demo(ScalingDemoConfig(out=args.out, depths=tuple(args.depths or defaults.depths),
                                                 epochs=args.epochs or defaults.epochs))
    minutes = (time.perf_counter() - started) / 60
    load_after = os.getloadavg()
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} (1 min) / {load_after[1]:.1f} (5 min) after; "
          f"{minutes:.1f} minutes in all")
    print("stage seconds: " + ", ".join(f"{k} {v:g}" for k, v in summary["stage_seconds"].items()))
    print("\n| fit | alpha | 95% CI | beta | r | points |\n| --- | --- | --- | --- | --- | --- |")
    for key, fit in summary["fits"].items():
        if fit["alpha"] is None:
            print(f"| {key} | — | — | — | — | {len(fit['points'])} ({fit['problem']}) |")
            continue
        ci = "—" if fit["alpha_ci"] is None else f"[{fit['alpha_ci'][0]:.3f}, {fit['alpha_ci'][1]:.3f}]"
        print(f"| {key} | {fit['alpha']:.3f} | {ci} | {fit['beta']:.3g} | {fit['r']:.3f} | {len(fit['points'])} |")
    if args.copy_plot:
        shutil.copyfile(summary["files"]["scaling_losses.png"], args.copy_plot)
        print(f"plot copied to {args.copy_plot}")


if __name__ == "__main__":
    main()
