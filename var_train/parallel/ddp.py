"""DistributedDataParallel for models small enough to replicate (d16 fits easily on one GPU).

fp32 parameters and AdamW states on every rank; bf16 compute under autocast (the reference's
own recipe). Gradient accumulation uses `no_sync`, which DDP needs to know before the forward
pass (it arms its gradient hooks there). The contract tells the engine at `backward` whether a
micro-batch syncs, so the engine predicts it from the accumulation count: micro-batch
`grad_accumulation_steps - 1` of each step syncs. If the trainer's pattern ever differs, the
result stays correct: a forward that armed the hooks before a non-syncing backward just
all-reduces early, and a syncing backward after an unarmed forward all-reduces by hand.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from .activation_checkpoint import apply_activation_checkpointing, apply_compile
from .engine import Engine, global_grad_norm
from .optimizer import build_optimizer


class _AccumulatingDDP(nn.Module):
    """Calls the DDP module inside `no_sync()` when the engine expects no gradient sync."""

    def __init__(self, ddp: DistributedDataParallel, engine: "DDPEngine"):
        super().__init__()
        self.ddp = ddp
        self._engine = [engine]  # a list, so the engine is not registered as a submodule

    def forward(self, *args, **kwargs):
        engine = self._engine[0]
        if torch.is_grad_enabled() and self.training and not engine.expect_sync:
            engine.forward_armed_sync = False
            with self.ddp.no_sync():
                return self.ddp(*args, **kwargs)
        engine.forward_armed_sync = True
        return self.ddp(*args, **kwargs)


class DDPEngine(Engine):
    name = "ddp"

    def __init__(self, model: nn.Module, parallel_cfg, optim_cfg, device: torch.device,
                 world_size: int, grad_accumulation_steps: int):
        if parallel_cfg.precision not in ("bf16", "fp32"):
            raise ValueError(f"parallel.precision must be 'bf16' or 'fp32', got {parallel_cfg.precision!r}")
        model.to(device)
        if parallel_cfg.activation_checkpointing:
            apply_activation_checkpointing(model.blocks)
        if parallel_cfg.compile:
            apply_compile(model.blocks)
        # The VAR's buffers are constants (scale index, mask): no need to broadcast them every forward.
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      broadcast_buffers=False)
        self.ddp = ddp
        self.world_size = world_size
        self.micro_step = 0
        self.forward_armed_sync = True
        super().__init__(_AccumulatingDDP(ddp, self), model, build_optimizer(model, optim_cfg), device,
                         parallel_cfg.precision, grad_accumulation_steps)

    @property
    def expect_sync(self) -> bool:
        return (self.micro_step + 1) % self.grad_accumulation_steps == 0

    def backward(self, loss: torch.Tensor, sync_gradients: bool) -> None:
        loss.backward()
        if sync_gradients and not self.forward_armed_sync:
            self._all_reduce_gradients()
        self.micro_step = 0 if sync_gradients else self.micro_step + 1

    @torch.no_grad()
    def _all_reduce_gradients(self) -> None:
        for param in self.unwrapped_model.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad.div_(self.world_size)

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        # Gradients are identical on every rank after the all-reduce: the local norm is global.
        return global_grad_norm(list(self.unwrapped_model.parameters()), max_norm)

    def dcp_state(self) -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import get_state_dict
        return get_state_dict(self.ddp, self.optimizer)

    def load_dcp_state(self, model_state: dict, optimizer_state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict
        set_state_dict(self.ddp, self.optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.unwrapped_model.state_dict().items()}
