"""Tokenizer training throughput at the demo config, and (optionally) a timed demo training run.

    python benchmarks/bench_tokenizer.py                       # images/s of one training step
    python benchmarks/bench_tokenizer.py --train-minutes 5     # + train on the digits, report
                                                               #   held-out MSE and codebook usage

The step timed is what `train_tokenizer` does per batch: VQVAE forward (straight-through
quantizer over all scales), reconstruction + VQ loss, backward, AdamW step, dead-code bookkeeping.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, time_it  # noqa: E402
from data_prep.codebook_restart import DeadCodeRestarter  # noqa: E402
from data_prep.commands.train_tokenizer import PRESETS  # noqa: E402
from data_prep.demo_data import write_demo_data  # noqa: E402
from data_prep.tokenizer_training import TokenizerTrainingConfig, train_tokenizer  # noqa: E402
from var_train.models import VQVAE  # noqa: E402

DEMO = PRESETS["demo"]


def step_throughput(batch_size: int, device: torch.device) -> float:
    vae = VQVAE(vocab_size=DEMO["vocab_size"], z_channels=DEMO["z_channels"], ch=DEMO["ch"],
                patch_nums=DEMO["patch_nums"]).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=DEMO["lr"], betas=(0.5, 0.9))
    restarter = DeadCodeRestarter(DEMO["vocab_size"], DEMO["dead_code_steps"], device)
    images = torch.rand(batch_size, 3, vae.resolution, vae.resolution, device=device) * 2 - 1

    def step():
        out = vae(images)
        loss = torch.nn.functional.mse_loss(out.reconstruction, images) + out.vq_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        restarter.update(out.tokens_per_scale)

    seconds = time_it(step, device, warmup=1, repeats=5)
    return batch_size / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=DEMO["batch_size"])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--train-minutes", type=float, default=0.0, help="also run a demo training this long")
    parser.add_argument("--data-dir", default=None, help="demo ImageFolder (default: written to a temp dir)")
    parser.add_argument("--output-dir", default=None, help="run directory of the demo training (default: temp)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config_text = ", ".join(f"{k}={DEMO[k]}" for k in ("vocab_size", "z_channels", "ch", "patch_nums"))
    print(f"machine: {machine()}")
    print(f"demo tokenizer ({config_text}), batch {args.batch_size}: "
          f"{step_throughput(args.batch_size, device):.1f} training images/s")
    if args.train_minutes <= 0:
        return
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = Path(args.data_dir or Path(scratch) / "digits")
        if not data_dir.is_dir():
            write_demo_data(data_dir, resolution=64, progress=False)
        config = TokenizerTrainingConfig(data_dir=str(data_dir), output_dir=args.output_dir or str(Path(scratch) / "run"),
                                         **{**DEMO, "max_minutes": args.train_minutes, "max_steps": 100_000},
                                         num_workers=1, resume=False, progress=False)
        result = train_tokenizer(config)
        usage = ", ".join(f"{k.removeprefix('val_codebook_usage_')}: {v:.3f}"
                          for k, v in result.val_after.items() if "usage" in k)
        print(f"demo training: {result.step} steps ({result.step * config.batch_size} images) in "
              f"{result.minutes:.1f} min; held-out MSE {result.val_before['val_mse']:.4f} -> "
              f"{result.val_after['val_mse']:.4f}; codebook usage per scale (held-out) {usage}")


if __name__ == "__main__":
    main()
