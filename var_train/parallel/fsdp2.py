"""FSDP2: `fully_shard` per transformer block, then the root (torchtitan's layout).

Each block is one communication group: its parameters are all-gathered just before its forward
(and again before its backward when `reshard_after_forward`, ZeRO-3 behaviour; kept unsharded
between forward and backward otherwise, ZeRO-2 behaviour) and its gradients reduce-scattered right
after its backward. The root group holds the rest: embeddings, position tables, head.

Mixed precision (precision="bf16"): the blocks run with bf16 parameters and reduce gradients in
fp32; sharded parameters, gradients and AdamW states stay fp32. The root keeps fp32 parameters:
the VAR computes its logits in fp32 with autocast off, so a bf16 head would not even accept the
fp32 hidden state (and the root is a few percent of the weights). The forward also runs under
autocast: it keeps layer norms and softmax in fp32 and casts the fp32 buffers that meet bf16
parameters inside a block (the attention's zero key bias); on bf16 parameters the matmul casts
are no-ops.

With `replicate_degree` > 1 the mesh is 2-D (replicate, shard): parameters are sharded within a
group of world/replicate ranks (one node, typically) and replicated across groups (HSDP), so
all-gathers stay on the fast intra-node links.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from .engine import Engine, EngineSetup
from .optimizer import build_optimizer

# The VAR's logits leave the root module as a view of the head's matmul; the trainer never
# modifies them in place, which is what this FSDP2 warning is about.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def build_mesh(device: torch.device, world_size: int, replicate_degree: int) -> DeviceMesh:
    if replicate_degree < 1 or world_size % replicate_degree:
        raise ValueError(f"parallel.replicate_degree={replicate_degree} must be >= 1 and divide the "
                         f"world size {world_size}")
    if replicate_degree == 1:
        return init_device_mesh(device.type, (world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(device.type, (replicate_degree, world_size // replicate_degree),
                            mesh_dim_names=("replicate", "shard"))


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision == "fp32":
        return MixedPrecisionPolicy()
    raise ValueError(f"parallel.precision must be 'bf16' or 'fp32', got {precision!r}")


def shard_model(model: nn.Module, units: list[nn.Module], mesh: DeviceMesh, precision: str,
                reshard_after_forward: bool) -> nn.Module:
    """fully_shard each unit (already checkpointed / compiled by build_engine), then the root.
    Modifies `model` in place and returns it."""
    unit_policy = mixed_precision_policy(precision)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=unit_policy, reshard_after_forward=reshard_after_forward)
    # The root's parameters are needed again as soon as backward starts: never reshard them.
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(), reshard_after_forward=False)
    return model


class FSDP2Engine(Engine):
    name = "fsdp2"

    def __init__(self, model: nn.Module, units: list[nn.Module], setup: EngineSetup):
        parallel = setup.parallel
        self.mesh = build_mesh(setup.device, setup.world_size, parallel.replicate_degree)
        shard_model(model, units, self.mesh, parallel.precision, parallel.reshard_after_forward)
        super().__init__(model, model, build_optimizer(model, setup.parameter_groups, setup.optim), setup)

    @classmethod
    def shards_parameters(cls, parallel_cfg) -> bool:
        return True

    @contextlib.contextmanager
    def _gradient_sync(self, sync: bool):
        # Without sync, gradients accumulate unsharded in fp32 locally and are reduce-scattered
        # on the last micro-batch (more memory, one reduction per optimizer step).
        self.model.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    @contextlib.contextmanager
    def full_model(self):
        # The root group (embeddings, position tables, head) is gathered for the whole context;
        # each block all-gathers its own weights in its forward, as in training.
        self.model.unshard()
        try:
            yield self.model
        finally:
            self.model.reshard()

    @staticmethod
    def state_bytes(num_params: float, unit_params: float, parallel_cfg, world_size: int,
                    compute_bytes: int) -> tuple[float, float, float]:
        """(parameters, gradients, AdamW states) bytes per GPU, for the dry run's estimate."""
        shard = world_size // max(1, parallel_cfg.replicate_degree)
        # Unsharded copies: two units in flight (current and prefetched), or every unit from
        # forward to backward without resharding (ZeRO-2 behaviour).
        gathered = (num_params if not parallel_cfg.reshard_after_forward else 2 * unit_params) * compute_bytes
        params = 4 * num_params / shard + gathered
        grads = 4 * num_params / shard + 2 * unit_params * 4
        return params, grads, 8 * num_params / shard
