"""DistributedDataParallel for models small enough to replicate (d16 fits easily on one GPU).

fp32 parameters and AdamW states on every rank; bf16 compute under autocast (the reference's
own recipe). Gradient accumulation uses DDP's `no_sync`, which must be entered before the forward
pass (DDP arms its reduction hooks there): `micro_batch(sync=False)` does exactly that.
"""

from __future__ import annotations

import contextlib
import warnings

import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from .engine import Engine, EngineSetup
from .optimizer import build_optimizer


# On CPUs, oneDNN returns the weight gradient of a 1x1 convolution (the VQVAE has several) in a
# channels-last layout; DDP then copies it into its bucket instead of viewing it, and says so at
# every first backward. The copy is one small tensor per such layer: nothing to act on.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


class DDPEngine(Engine):
    name = "ddp"

    def __init__(self, model: nn.Module, units: list[nn.Module], setup: EngineSetup):
        device = setup.device
        # The VAR's buffers are constants (scale index, mask): synced once at construction, not
        # broadcast again before every forward.
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      forward_sync_buffers=False)
        super().__init__(ddp, model, build_optimizer(model, setup.parameter_groups, setup.optim), setup)

    def _gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if sync else self.model.no_sync()

    @staticmethod
    def state_bytes(num_params: float, unit_params: float, parallel_cfg, world_size: int,
                    compute_bytes: int) -> tuple[float, float, float]:
        """(parameters, gradients, AdamW states) bytes per GPU: everything replicated; gradients
        twice (DDP's reduction buckets)."""
        return 4 * num_params, 8 * num_params, 8 * num_params
