"""AdamW over the parameter groups the model defines.

The groups come from the model (`model.parameter_groups(weight_decay)`, or the plain
matrices-only rule of var_train.models.param_groups) and are recorded by parameter name before
any wrapper touches the model: activation checkpointing and compilation rename parameters
(`_checkpoint_wrapped_module.`, `_orig_mod.`) and FSDP2 replaces them by DTensors, so the
optimizer is built afterwards, from the same names. Groups keep their `name` ("decay" /
"no_decay"): the trainer sets every group's `lr` each step and schedules the `weight_decay` of the
"decay" group only.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from var_train.models.param_groups import model_parameter_groups

# Prefixes that activation checkpointing and torch.compile insert into parameter names.
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def clean_parameter_name(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def named_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The model's groups with parameter names instead of parameters: [{"name", "param_names",
    "weight_decay", ...}]. Call it on the plain model, before any wrapping."""
    names = {id(param): clean_parameter_name(name) for name, param in model.named_parameters()}
    groups = []
    for group in model_parameter_groups(model, weight_decay):
        unknown = [p for p in group["params"] if id(p) not in names]
        if unknown:
            raise ValueError(f"parameter group {group.get('name')!r} holds {len(unknown)} tensors that are "
                             f"not parameters of the model")
        entry = {key: value for key, value in group.items() if key != "params"}
        entry["param_names"] = [names[id(p)] for p in group["params"]]
        groups.append(entry)
    return groups


def build_optimizer(model: nn.Module, parameter_groups: list[dict], optim_cfg) -> torch.optim.AdamW:
    """AdamW over `model`'s current parameters (call it after sharding: FSDP2 replaces them),
    grouped as `parameter_groups` (from `named_parameter_groups`) says."""
    params = {clean_parameter_name(name): param for name, param in model.named_parameters()}
    groups = []
    for group in parameter_groups:
        missing = [name for name in group["param_names"] if name not in params]
        if missing:
            raise ValueError(f"parameter group {group.get('name')!r}: the wrapped model has no {missing[:5]}")
        entry = {key: value for key, value in group.items() if key != "param_names"}
        entry["params"] = [params[name] for name in group["param_names"]]
        groups.append(entry)
    return torch.optim.AdamW(groups, lr=optim_cfg.base_lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)
