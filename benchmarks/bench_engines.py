"""Training step time and images/s per engine (fsdp2, ddp, deepspeed), plus checkpoint save time.

  python benchmarks/bench_engines.py                       # 2 CPU processes, small VAR (CPU anchor)
  python benchmarks/bench_engines.py --nproc 8 --depth 16 --micro-batch 32 --precision bf16   # one GPU node

Started without a launcher, the script re-launches itself under torchrun with --nproc processes.
A step is forward + backward + clip + AdamW on random tokens (teacher input random too: the
quantizer's cost is not part of the engine comparison). Figures are the median over --steps
steps after --warmup steps, measured on rank 0; images/s counts the global batch.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine, synchronize  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2, help="processes to launch when not under torchrun")
    parser.add_argument("--engines", default="fsdp2,ddp,deepspeed", help="comma-separated engines")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--embed-dim", type=int, default=256)
    parser.add_argument("--patch-nums", default="1,2,3,4,5,6,8,10,13,16")
    parser.add_argument("--micro-batch", type=int, default=2, help="images per rank per step")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    return parser.parse_args()


def relaunch(args: argparse.Namespace) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           "--master_addr=127.0.0.1", "--master_port=29533", *sys.argv]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(cmd, env=env)


def bench_engine(name: str, args, info) -> dict:
    from var_train.checkpoint import Checkpointer
    from var_train.config import CheckpointConfig, OptimConfig, ParallelConfig
    from var_train.models import VAR
    from var_train.parallel import build_engine

    patch_nums = tuple(int(p) for p in args.patch_nums.split(","))
    torch.manual_seed(0)
    model = VAR(depth=args.depth, embed_dim=args.embed_dim, num_heads=max(1, args.embed_dim // 64),
                patch_nums=patch_nums)
    model.init_weights()
    num_params = sum(p.numel() for p in model.parameters())
    parallel = ParallelConfig(engine=name, precision=args.precision, zero_stage=args.zero_stage)
    optim = OptimConfig(global_batch_size=args.micro_batch * info.world_size, micro_batch_size=args.micro_batch)
    engine = build_engine(model, parallel, optim, info.device)
    tokens = model.num_tokens
    labels = torch.randint(0, model.num_classes, (args.micro_batch,), device=info.device)
    teacher_input = torch.randn(args.micro_batch, tokens - patch_nums[0] ** 2, model.z_channels, device=info.device)
    targets = torch.randint(0, model.vocab_size, (args.micro_batch, tokens), device=info.device)

    def step() -> None:
        with engine.micro_batch(sync=True):
            with engine.autocast():
                logits = engine.model(labels, teacher_input)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
            engine.backward(loss)
        engine.clip_grad_norm(2.0)
        engine.optimizer_step()
        engine.zero_grad()

    times = []
    for index in range(args.warmup + args.steps):
        dist.barrier()
        start = time.perf_counter()
        step()
        synchronize(info.device)
        dist.barrier()
        if index >= args.warmup:
            times.append(time.perf_counter() - start)
    step_seconds = sorted(times)[len(times) // 2]

    run_dir = tempfile.mkdtemp(prefix="bench-ckpt-") if info.rank == 0 else None
    holder = [run_dir]
    dist.broadcast_object_list(holder)
    checkpointer = Checkpointer(CheckpointConfig(keep_last=1, resume="none"), holder[0])
    dist.barrier()
    start = time.perf_counter()
    checkpointer.save(1, engine, {"step": 1})
    save_seconds = time.perf_counter() - start
    return {"engine": name, "params": num_params, "step_s": step_seconds,
            "images_per_s": args.micro_batch * info.world_size / step_seconds, "save_s": save_seconds}


def main() -> int:
    args = parse_args()
    if "RANK" not in os.environ:
        return relaunch(args)
    from var_train.parallel import init_distributed

    info = init_distributed()
    results = [bench_engine(name, args, info) for name in args.engines.split(",")]
    if info.rank == 0:
        tokens = sum(int(p) ** 2 for p in args.patch_nums.split(","))
        print(f"machine: {machine()}, {info.world_size} processes ({info.backend}); VAR depth {args.depth}, "
              f"width {args.embed_dim}, {results[0]['params'] / 1e6:.1f}M params, L={tokens}, "
              f"micro-batch {args.micro_batch}/rank, {args.precision}")
        for r in results:
            label = f"deepspeed zero{args.zero_stage}" if r["engine"] == "deepspeed" else r["engine"]
            print(f"{label:16s} step {r['step_s'] * 1000:8.1f} ms   {r['images_per_s']:7.2f} images/s   "
                  f"checkpoint save {r['save_s']:.2f} s")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
