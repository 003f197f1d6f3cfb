"""AdamW parameter groups: which parameters a model lets weight decay pull towards zero.

A model that has its own rule defines `parameter_groups(weight_decay) -> list[dict]` (the VAR
does); any other model gets `decay_groups(model.named_parameters(), weight_decay)`. Each group is
{"name", "params", "weight_decay"}; the names are "decay" and "no_decay", and the trainer
schedules the weight decay of the "decay" group only (the other stays 0).
"""

from __future__ import annotations

from typing import Iterable

import torch.nn as nn

DECAY_GROUP, NO_DECAY_GROUP = "decay", "no_decay"


def decay_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                 no_decay_names: tuple[str, ...] = ()) -> list[dict]:
    """Decay the matrices; keep 1-D parameters, biases and any parameter whose name contains one of
    `no_decay_names` out of weight decay. Frozen parameters (requires_grad False) are left out."""
    decay, no_decay = [], []
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        exempt = param.ndim <= 1 or name.endswith("bias") or any(part in name for part in no_decay_names)
        (no_decay if exempt else decay).append(param)
    return [
        {"name": DECAY_GROUP, "params": decay, "weight_decay": weight_decay},
        {"name": NO_DECAY_GROUP, "params": no_decay, "weight_decay": 0.0},
    ]


def model_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The model's own groups when it defines them, else the plain matrices-only rule."""
    own = getattr(model, "parameter_groups", None)
    return own(weight_decay) if callable(own) else decay_groups(model.named_parameters(), weight_decay)
