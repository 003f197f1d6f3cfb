"""The model's wrap units, and per-unit activation checkpointing and compilation.

A model names the classes of its repeated blocks in `block_classes` (the VAR: its transformer
blocks); every outermost submodule of one of those classes is a unit. Checkpointing and
compilation replace each unit in its parent by a wrapper, so they compose with FSDP2 applied
afterwards to the same units. The wrappers add `_checkpoint_wrapped_module.` / `_orig_mod.` to
parameter names; torch.distributed.checkpoint's state-dict helpers remove them again, so
checkpoints and exports keep the reference's names whatever is switched on.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

UnitSlot = tuple[nn.Module, str]  # (parent module, attribute name of the unit in it)


def wrap_unit_slots(model: nn.Module) -> list[UnitSlot]:
    """Where the model's units sit; none when the model declares no `block_classes`."""
    classes = tuple(getattr(model, "block_classes", ()) or ())
    slots: list[UnitSlot] = []

    def visit(module: nn.Module) -> None:
        for name, child in module.named_children():
            if classes and isinstance(child, classes):
                slots.append((module, name))
            else:
                visit(child)

    visit(model)
    return slots


def replace_units(slots: list[UnitSlot], wrap: Callable[[nn.Module], nn.Module]) -> None:
    for parent, name in slots:
        setattr(parent, name, wrap(getattr(parent, name)))


def checkpointed(unit: nn.Module) -> nn.Module:
    """Recompute the unit's activations in backward instead of storing them (non-reentrant
    torch.utils.checkpoint: it works with FSDP2 hooks and keyword arguments)."""
    return checkpoint_wrapper(unit, checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=True)


def compiled(unit: nn.Module) -> nn.Module:
    """torch.compile one unit: identical blocks share one graph (same shapes), so it is compiled
    once, and FSDP2's hooks stay outside the compiled region."""
    return torch.compile(unit)
