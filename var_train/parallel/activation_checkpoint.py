"""Per-block activation checkpointing and per-block compilation of the transformer.

Both replace `model.blocks[i]` in place by a wrapper, so they compose with FSDP2 applied
afterwards to the same entries. The wrappers add `_checkpoint_wrapped_module.` / `_orig_mod.` to
parameter names; torch.distributed.checkpoint's state-dict helpers remove them again, so
checkpoints and exports keep the reference's names whatever is switched on.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper


def apply_activation_checkpointing(blocks: nn.ModuleList) -> None:
    """Recompute each block's activations in backward instead of storing them (non-reentrant
    torch.utils.checkpoint: it works with FSDP2 hooks and keyword arguments)."""
    for index, block in enumerate(blocks):
        blocks[index] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                                           preserve_rng_state=True)


def apply_compile(blocks: nn.ModuleList, **compile_kwargs) -> None:
    """torch.compile each block separately: all blocks share one graph (same shapes), so it is
    compiled once, and FSDP2's hooks stay outside the compiled region."""
    for index, block in enumerate(blocks):
        blocks[index] = torch.compile(block, **compile_kwargs)
