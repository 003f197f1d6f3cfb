"""End-to-end training images/s from token shards against the reference's way of training.

  python benchmarks/bench_training.py --depth 6 --batch 4 --steps 3

(a) the Trainer's full step (loader, teacher input, model, optimizer) fed from 256px token
shards; (b) the reference's way, which encodes every batch with the ch160 VQVAE encoder before
the same step. The share of step time outside the model is `bench_train_overhead.py`'s job.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("WANDB_MODE", "disabled")
from benchmarks.common import machine  # noqa: E402


def synthetic_shards(out: Path, patch_nums, vocab_size: int, num_classes: int, records: int) -> Path:
    import numpy as np

    from data_prep.shards import shard_name, write_shard
    from var_train.data.manifest import Manifest, ShardInfo, write_manifest
    from var_train.data.records import TokenRecord

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    length = sum(p * p for p in patch_nums)
    shards, per_shard = [], 1000
    for index, start in enumerate(range(0, records, per_shard)):
        rows = [TokenRecord(key=f"r{i:07d}", tokens=rng.integers(0, vocab_size, length).astype(np.uint16),
                            label=int(i % num_classes)) for i in range(start, min(records, start + per_shard))]
        write_shard(out / shard_name(index), rows)
        shards.append(ShardInfo(shard_name(index), len(rows)))
    write_manifest(out, Manifest(num_records=records, num_shards=len(shards), shards=shards, num_classes=num_classes,
                                 class_names=[str(c) for c in range(num_classes)], resolution=16 * patch_nums[-1],
                                 patch_nums=list(patch_nums), vocab_size=vocab_size, num_tokens=length,
                                 has_flip=False, num_crops=1, tool="benchmarks/bench_training.py"))
    return out


def build_trainer(overrides: list[str], recipe: str, workdir: Path, records: int):
    from var_train.config import load_config
    from var_train.models import VQVAE
    from var_train.models.checkpoint_io import save_model
    from var_train.train import Trainer

    cfg = load_config(recipe, overrides)
    m = cfg.model
    shards = synthetic_shards(workdir / "shards", m.patch_nums, m.vocab_size, m.num_classes, records)
    vae = save_model(VQVAE(vocab_size=m.vocab_size, z_channels=m.z_channels, ch=32, patch_nums=m.patch_nums).quantize,
                     workdir / "quantizer.safetensors")
    cfg = load_config(recipe, [*overrides, f"data.train_shards={shards}", f"data.vae={vae}",
                               f"run.output_dir={workdir / 'run'}", "checkpoint.every_steps=0",
                               "logging.wandb_mode=disabled", "checkpoint.resume=none"])
    return Trainer(cfg)


def timed(fn, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def cmd_vs_reference(args):
    from var_train.models import VQVAE

    overrides = [f"model.depth={args.depth}", f"model.embed_dim={64 * args.depth}", f"model.num_heads={args.depth}",
                 "model.alng=null", "model.patch_nums=[1,2,3,4,5,6,8,10,13,16]",
                 "model.vocab_size=4096", "model.z_channels=32", "model.num_classes=1000",
                 f"optim.global_batch_size={args.batch}", f"optim.micro_batch_size={args.batch}",
                 "parallel.engine=ddp", "parallel.precision=fp32", "data.num_workers=1"]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(overrides, "recipes/tiny.yaml", Path(tmp), records=args.batch * 64)
        trainer.engine.unwrapped_model.train()
        trainer.train_step()
        ours = timed(trainer.train_step, args.steps)
        trainer.logger.close()
    torch.manual_seed(0)
    vae = VQVAE().eval()  # ch160, the released architecture (random weights cost the same)
    images = torch.rand(args.batch, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        vae.image_to_tokens(images)
        encode = timed(lambda: vae.image_to_tokens(images), max(1, args.steps // 2))
    print(f"machine: {machine()}")
    print(f"VAR d{args.depth}, batch {args.batch}, 256px (L=680), fp32")
    print(f"ours (token shards):       step {ours:.2f} s -> {args.batch / ours:.2f} images/s")
    print(f"reference way (encode+step): encode {encode:.2f} s + step {ours:.2f} s -> "
          f"{args.batch / (encode + ours):.2f} images/s")
    print(f"speed-up: {(encode + ours) / ours:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    cmd_vs_reference(parser.parse_args())


if __name__ == "__main__":
    main()
