"""Data parallelism: the only package that knows how a model is sharded or replicated.

    engine = build_engine(model, cfg.parallel, cfg.optim, device)

Engines: "fsdp2" (default; FSDP2 `fully_shard` per block, optional HSDP), "deepspeed" (ZeRO-1/2/3)
and "ddp". All share the `Engine` interface (see engine.py for the step protocol).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from .distributed import DistributedInfo, destroy_distributed, init_distributed
from .engine import Engine
from .memory import estimate_memory_per_gpu
from .optimizer import build_optimizer, parameter_groups

ENGINES = ("fsdp2", "deepspeed", "ddp")


def grad_accumulation_steps(optim_cfg, world_size: int) -> int:
    per_step = optim_cfg.micro_batch_size * world_size
    if optim_cfg.global_batch_size % per_step:
        raise ValueError(f"optim.global_batch_size={optim_cfg.global_batch_size} is not a multiple of "
                         f"optim.micro_batch_size x world size = {optim_cfg.micro_batch_size} x {world_size}")
    return optim_cfg.global_batch_size // per_step


def build_engine(model: nn.Module, parallel_cfg, optim_cfg, device: torch.device) -> Engine:
    """Wrap `model` (on any device; it is moved) for data-parallel training; needs the process
    group of `init_distributed()`. Applies activation checkpointing -> compile -> sharding."""
    if not dist.is_initialized():
        raise RuntimeError("build_engine needs a process group: call var_train.parallel.init_distributed() first")
    world_size = dist.get_world_size()
    accumulation = grad_accumulation_steps(optim_cfg, world_size)
    args = (model, parallel_cfg, optim_cfg, torch.device(device), world_size, accumulation)
    if parallel_cfg.engine == "fsdp2":
        from .fsdp2 import FSDP2Engine
        return FSDP2Engine(*args)
    if parallel_cfg.engine == "ddp":
        from .ddp import DDPEngine
        return DDPEngine(*args)
    if parallel_cfg.engine == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine
        return DeepSpeedEngine(*args)
    raise ValueError(f"parallel.engine must be one of {ENGINES}, got {parallel_cfg.engine!r}")


__all__ = [
    "ENGINES", "DistributedInfo", "Engine", "build_engine", "build_optimizer", "destroy_distributed",
    "estimate_memory_per_gpu", "grad_accumulation_steps", "init_distributed", "parameter_groups",
]
