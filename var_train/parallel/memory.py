"""Rough per-GPU memory estimate for `var-train train --dry-run`.

Counts, in bytes: parameters (fp32 masters plus the unsharded compute copies that FSDP2 / ZeRO-3
gather), gradients, AdamW states and activations. The engine says how its sharding divides the
first three (`Engine.state_bytes`); the model says what one image's activations cost
(`model.activation_bytes_per_image(compute_bytes, activation_checkpointing)`). Allocator
fragmentation, communication buffers and the CUDA context are not counted: budget 10-20% on top.
"""

from __future__ import annotations

import torch.nn as nn

from .activation_checkpoint import wrap_unit_slots
from .registry import engine_class


def estimate_memory_per_gpu(model: nn.Module, parallel_cfg, world_size: int,
                            micro_batch_size: int) -> dict[str, float]:
    """-> {"params", "grads", "optimizer_states", "activations", "total"} in bytes per GPU. The
    model may live on the meta device (only shapes are read)."""
    engine = engine_class(parallel_cfg.engine)
    num_params = float(sum(p.numel() for p in model.parameters()))
    units = [getattr(parent, name) for parent, name in wrap_unit_slots(model)]
    unit_params = float(max((sum(p.numel() for p in unit.parameters()) for unit in units), default=num_params))
    compute_bytes = 2 if parallel_cfg.precision == "bf16" else 4
    params, grads, optimizer = engine.state_bytes(num_params, unit_params, parallel_cfg, world_size, compute_bytes)
    activations = micro_batch_size * model.activation_bytes_per_image(compute_bytes,
                                                                     parallel_cfg.activation_checkpointing)
    estimate = {"params": params, "grads": grads, "optimizer_states": optimizer, "activations": activations}
    estimate["total"] = sum(estimate.values())
    return {k: float(v) for k, v in estimate.items()}
