"""Tokenizer training throughput at the demo config, and (optionally) a timed demo training run.

    python benchmarks/bench_tokenizer.py                       # images/s of one training step
    python benchmarks/bench_tokenizer.py --train-minutes 5     # + train on the digits, report
                                                               #   held-out MSE and codebook usage

Two steps are timed side by side on the same fixed batch: `TokenizerTrainer.train_step` (the
real one: DDP engine in a world of one, LR schedule, loss terms, global gradient norm, AdamW,
codebook usage and dead-code bookkeeping) and a bare step (plain module: forward, L2 + VQ loss,
backward, AdamW); their ratio is the trainer machinery's overhead.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, time_it  # noqa: E402
from data_prep.commands.train_tokenizer import PRESETS  # noqa: E402
from data_prep.demo_data import write_demo_data  # noqa: E402
from var_train.models import VQVAE  # noqa: E402
from var_train.tokenizer import TokenizerTrainer, TokenizerTrainingConfig, train_tokenizer  # noqa: E402

DEMO = PRESETS["demo"]


def _demo_config(data_dir: Path, output_dir: Path, **overrides) -> TokenizerTrainingConfig:
    fields = {**DEMO, "num_workers": 0, "resume": False, "progress": False, "wandb_mode": "disabled", **overrides}
    return TokenizerTrainingConfig(data_dir=str(data_dir), output_dir=str(output_dir), **fields)


def step_throughput(data_dir: Path, scratch: Path, batch_size: int, repeats: int) -> tuple[float, float]:
    """-> (trainer step, bare step) images/s on one fixed batch."""
    trainer = TokenizerTrainer(_demo_config(data_dir, scratch / "bench", batch_size=batch_size))
    device = trainer.device
    images = next(trainer._batches).to(device)
    trainer._batches = itertools.repeat(images)  # time the step, not the image decoding
    trainer.vae.train()
    trainer_seconds = time_it(trainer.train_step, device, warmup=1, repeats=repeats)

    vae = VQVAE(vocab_size=DEMO["vocab_size"], z_channels=DEMO["z_channels"], ch=DEMO["ch"],
                patch_nums=DEMO["patch_nums"]).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=DEMO["lr"], betas=(0.5, 0.9))

    def bare_step():
        out = vae(images)
        loss = torch.nn.functional.mse_loss(out.reconstruction, images) + out.vq_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    bare_seconds = time_it(bare_step, device, warmup=1, repeats=repeats)
    return batch_size / trainer_seconds, batch_size / bare_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=DEMO["batch_size"])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps of each kind (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--train-minutes", type=float, default=0.0, help="also run a demo training this long")
    parser.add_argument("--data-dir", default=None, help="demo ImageFolder (default: written to a temp dir)")
    parser.add_argument("--output-dir", default=None, help="run directory of the demo training (default: temp)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    config_text = ", ".join(f"{k}={DEMO[k]}" for k in ("vocab_size", "z_channels", "ch", "patch_nums"))
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        data_dir = Path(args.data_dir or scratch / "digits")
        if not data_dir.is_dir():
            write_demo_data(data_dir, resolution=64, progress=False)
        trainer_rate, bare_rate = step_throughput(data_dir, scratch, args.batch_size, args.repeats)
        print(f"demo tokenizer ({config_text}), batch {args.batch_size}: TokenizerTrainer.train_step "
              f"{trainer_rate:.1f} images/s, bare step {bare_rate:.1f} images/s (trainer/bare "
              f"{trainer_rate / bare_rate:.2f})")
        if args.train_minutes <= 0:
            return
        config = _demo_config(data_dir, args.output_dir or scratch / "run", max_minutes=args.train_minutes,
                              num_workers=1)
        result = train_tokenizer(config)
        usage = ", ".join(f"{k.removeprefix('val/codebook_usage_')}: {v:.3f}"
                          for k, v in result.val_after.items() if k.startswith("val/codebook_usage_"))
        print(f"demo training: {result.step} steps ({result.step * config.batch_size} images) in "
              f"{result.minutes:.1f} min; held-out MSE {result.val_before['val/mse']:.4f} -> "
              f"{result.val_after['val/mse']:.4f}; codebook usage per scale (held-out) {usage}")


if __name__ == "__main__":
    main()
