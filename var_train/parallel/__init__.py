"""Data parallelism: the only package that knows how a model is sharded or replicated.

    engine = build_engine(model, cfg.parallel, cfg.optim, device)

Engines: "fsdp2" (default; FSDP2 `fully_shard` per block, optional HSDP), "deepspeed" (ZeRO-1/2/3),
"ddp" and "accelerate" (Accelerator.prepare, configured by the user's Accelerate config). All
share the `Engine` interface (engine.py: the step protocol, the full model, checkpoint state).
Adding an engine: a module here with an `Engine` subclass, and one line in ENGINES (registry.py).

Any nn.Module can be trained: it may name its repeated blocks in `block_classes` (the units that
are checkpointed, compiled and sharded one by one) and define `parameter_groups(weight_decay)`
(else 1-D parameters and biases are not decayed); see var_train.models.param_groups.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from var_train.errors import ConfigError

from .activation_checkpoint import checkpointed, compiled, replace_units, wrap_unit_slots
from .distributed import DistributedInfo, destroy_distributed, init_distributed
from .engine import Engine, EngineSetup
from .memory import estimate_memory_per_gpu
from .optimizer import build_optimizer, named_parameter_groups
from .registry import ENGINES, engine_class


def grad_accumulation_steps(optim_cfg, world_size: int) -> int:
    per_step = optim_cfg.micro_batch_size * world_size
    if optim_cfg.global_batch_size % per_step:  # known only now that the world size is
        raise ConfigError(f"optim.global_batch_size={optim_cfg.global_batch_size} is not a multiple of "
                          f"optim.micro_batch_size x world size = {optim_cfg.micro_batch_size} x {world_size}: "
                          f"make it a multiple of {per_step} or change optim.micro_batch_size")
    return optim_cfg.global_batch_size // per_step


def build_engine(model: nn.Module, parallel_cfg, optim_cfg, device: torch.device | str) -> Engine:
    """Wrap `model` (on any device; it is moved, and modified in place) for data-parallel training;
    needs the process group of `init_distributed()`. The one place the order is written:
    parameter groups (by name, from the plain model) -> activation checkpointing per unit ->
    compile per unit -> the engine's wrapping (fsdp2: fully_shard per unit, then the root) ->
    AdamW."""
    if not dist.is_initialized():
        raise RuntimeError("build_engine needs a process group: call var_train.parallel.init_distributed() first")
    engine = engine_class(parallel_cfg.engine)
    engine.check_config(parallel_cfg)
    world_size = dist.get_world_size()
    setup = EngineSetup(parallel=parallel_cfg, optim=optim_cfg, device=torch.device(device), world_size=world_size,
                        grad_accumulation_steps=grad_accumulation_steps(optim_cfg, world_size),
                        parameter_groups=named_parameter_groups(model, optim_cfg.weight_decay))
    model.to(setup.device)
    slots = wrap_unit_slots(model)
    if parallel_cfg.activation_checkpointing:
        replace_units(slots, checkpointed)
    if parallel_cfg.compile:
        replace_units(slots, compiled)
    units = [getattr(parent, name) for parent, name in slots]
    return engine(model, units, setup)


def consolidate_checkpoint(checkpoint_dir: str | Path, metadata: dict, model: nn.Module) -> dict[str, torch.Tensor]:
    """The full model state dict of a checkpoint directory, by the engine that wrote it (its
    metadata's "engine"); one process, no process group. `model`: a fresh model of its config."""
    return engine_class(metadata["engine"]).consolidate(checkpoint_dir, model)


__all__ = [
    "ENGINES", "DistributedInfo", "Engine", "build_engine", "build_optimizer", "consolidate_checkpoint",
    "destroy_distributed", "engine_class", "estimate_memory_per_gpu", "grad_accumulation_steps",
    "init_distributed", "named_parameter_groups",
]
