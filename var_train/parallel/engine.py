"""The interface the trainer drives, whatever does the data parallelism underneath.

One optimizer step over `grad_accumulation_steps` micro-batches:

    for micro_step, batch in enumerate(micro_batches):
        with engine.autocast():
            loss = criterion(engine.model(batch.labels, teacher_input), targets)
        engine.backward(loss / accumulation, sync_gradients=micro_step == accumulation - 1)
    for group in engine.optimizer.param_groups: group["lr"] = ...   # before clip_grad_norm
    grad_norm = engine.clip_grad_norm(max_norm)
    engine.optimizer_step()          # the trainer may skip it when grad_norm is not finite
    engine.zero_grad()

`backward` does not rescale the loss: the trainer divides by the accumulation count itself.
DeepSpeed computes the norm inside its own step, so its engine steps in `clip_grad_norm` (hence
the learning rate first) and skips non-finite steps itself.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn as nn

CHECKPOINT_FORMAT_DCP = "dcp"
CHECKPOINT_FORMAT_DEEPSPEED = "deepspeed"


class Engine(ABC):
    name: ClassVar[str]
    # "dcp": model/optimizer state through torch.distributed.checkpoint (fsdp2, ddp);
    # "deepspeed": DeepSpeed's own save_checkpoint/load_checkpoint.
    checkpoint_format: ClassVar[str] = CHECKPOINT_FORMAT_DCP
    # bf16 forward under torch.autocast (False where the engine's library does it itself).
    uses_autocast: ClassVar[bool] = True

    def __init__(self, model: nn.Module, unwrapped_model: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, precision: str, grad_accumulation_steps: int):
        self.model = model
        self.unwrapped_model = unwrapped_model
        self.optimizer = optimizer
        self.device = device
        self.precision = precision
        self.grad_accumulation_steps = grad_accumulation_steps

    # -- the step ---------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for the forward pass: bf16 autocast when precision is bf16, unless the engine
        does it itself (DeepSpeed's torch_autocast)."""
        if self.precision == "bf16" and self.uses_autocast:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor, sync_gradients: bool) -> None:
        """Accumulate gradients; average them over ranks only when `sync_gradients`."""

    @abstractmethod
    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        """Clip gradients to `max_norm` (no clipping for None or <= 0); return the total L2 norm
        over all ranks before clipping, as a 0-d float tensor."""

    def optimizer_step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # -- state ------------------------------------------------------------------------------------
    def dcp_state(self) -> tuple[dict, dict]:
        """(model, optimizer) state dicts for torch.distributed.checkpoint, keyed by clean
        parameter names (no wrapper prefixes), sharded where the engine shards."""
        from torch.distributed.checkpoint.state_dict import get_state_dict
        return get_state_dict(self.model, self.optimizer)

    def load_dcp_state(self, model_state: dict, optimizer_state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict
        set_state_dict(self.model, self.optimizer, model_state_dict=model_state,
                       optim_state_dict=optimizer_state)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict (reference key names, buffers included) as CPU tensors on
        every rank. Collective: every rank must call it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                          broadcast_from_rank0=False))
        return {key: value.detach().to("cpu", copy=True) for key, value in state.items()}


def global_grad_norm(parameters: list[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Total gradient norm of (possibly DTensor-sharded) parameters; clips in place when asked."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros((), device=parameters[0].device if parameters else "cpu")
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()  # partial per-shard sums -> the norm over all ranks
    if max_norm is not None and max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total.float()
