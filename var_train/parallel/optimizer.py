"""AdamW with the reference's two parameter groups.

Weight decay applies to the matrices of the linear layers and the class embedding only; 1-D
parameters, biases, the position/level/start embeddings, AdaLN gammas (`ada_gss`) and the
attention temperature `scale_mul` are not decayed (decaying a learned position table or a
temperature towards 0 only hurts). Groups carry a `name` so the trainer can tell which group's
`weight_decay` it schedules; it sets every group's `lr` each step.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

# Substrings of parameter names that are never decayed (besides every 1-D parameter and bias).
NO_WEIGHT_DECAY_NAMES = ("pos_start", "pos_1LC", "lvl_embed", "gamma", "ada_gss", "scale_mul")
DECAY_GROUP, NO_DECAY_GROUP = "decay", "no_decay"


def wants_weight_decay(name: str, param: torch.Tensor) -> bool:
    if param.ndim <= 1 or name.endswith("bias"):
        return False
    return not any(part in name for part in NO_WEIGHT_DECAY_NAMES)


def parameter_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in named_parameters:
        if param.requires_grad:
            (decay if wants_weight_decay(name, param) else no_decay).append(param)
    return [
        {"name": DECAY_GROUP, "params": decay, "weight_decay": weight_decay},
        {"name": NO_DECAY_GROUP, "params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, optim_cfg) -> torch.optim.AdamW:
    """AdamW over `model`'s parameters (call it after sharding: FSDP2 replaces them by DTensors)."""
    return torch.optim.AdamW(
        parameter_groups(model.named_parameters(), optim_cfg.weight_decay),
        lr=optim_cfg.base_lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
    )
