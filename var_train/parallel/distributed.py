"""Process-group set-up shared by every launcher: torchrun, accelerate launch, srun, or none.

Launchers describe the job through environment variables, read by `launch_env.launch_env()`:
torchrun and `accelerate launch` set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
a plain `srun python -m ...` sets SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID (master:
the step's first node; port: derived from the job id). A plain `python` run, or the batch shell
without srun, is a world of one.

A process group always exists after `init_distributed()`, even for one process (backed by an
in-memory store, so no port is opened): FSDP2's device mesh and DCP then need no special case.

The rank helpers below (`get_rank`, `get_world_size`, `is_main_process`, `barrier`,
`all_reduce_mean`, `broadcast_object`) are the only ones in the project: each works without a
process group too (a world of one: rank 0, no-op barrier, identity reductions), so callers never
test `dist.is_initialized()` themselves.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from .launch_env import device_index, launch_env


T = TypeVar("T")


@dataclass(frozen=True)
class DistributedInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launcher_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) of this process: torchrun/accelerate, else an srun step
    (SLURM_STEP_*, never the batch shell's SLURM_NTASKS), else (0, 1, 0). See launch_env.py."""
    env = launch_env()
    return env.rank, env.world_size, env.local_rank


def default_device(local_rank: int) -> torch.device:
    """This task's GPU among those it can see (all of the node's, or only its own), else the CPU."""
    index = device_index(local_rank, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    return torch.device("cpu") if index is None else torch.device("cuda", index)


def init_distributed(backend: str | None = None, timeout: timedelta = timedelta(minutes=30)) -> DistributedInfo:
    """Join (or create) the default process group; idempotent.

    Backend: NCCL for CUDA tensors plus gloo for CPU tensors on a GPU machine (checkpoint
    metadata and async saves use CPU collectives), gloo alone on a CPU machine.
    """
    env = launch_env(num_visible_gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0)
    rank, world_size, local_rank = env.rank, env.world_size, env.local_rank
    # Libraries that read the torchrun variables themselves (DeepSpeed asserts LOCAL_RANK) must
    # see the same values under srun or in a plain single process.
    for name, value in env.exports().items():
        os.environ.setdefault(name, value)
    if env.cpus_per_task and "OMP_NUM_THREADS" not in os.environ:  # else every task takes all cores
        torch.set_num_threads(env.cpus_per_task)
    device = torch.device("cpu") if env.device_index is None else torch.device("cuda", env.device_index)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # DeepSpeed (imported by its engine and by Accelerate) would guess, and warn on every rank
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if dist.is_initialized():
        return DistributedInfo(dist.get_rank(), dist.get_world_size(), local_rank, device,
                               str(dist.get_backend()))
    backend = backend or ("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    if world_size == 1:  # no rendezvous: no port opened, nothing to wait for
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        # env:// (MASTER_ADDR/PORT exported above): under torchrun it joins the agent's store.
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                                timeout=timeout)
    return DistributedInfo(rank, world_size, local_rank, device, backend)


def destroy_distributed() -> None:
    """Leave the process group while the interpreter is still fully alive.

    The run's garbage in reference cycles (engines, optimizers, device meshes) is collected before
    and after, so a group only those objects held is destroyed here, which joins its worker threads.
    A group a library keeps (DeepSpeed's world group) outlives this call; `command_line.exit_process`
    says why its threads must not meet the interpreter's teardown.
    """
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


# -- rank helpers: the same answers with or without a process group ---------------------------------
def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if _active() else 0


def get_world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a world of one)."""
    if _active() and dist.get_world_size() > 1:
        dist.barrier()


def collective_device() -> torch.device:
    """Where tensors must live to travel through the default group: CUDA under NCCL, else CPU."""
    if _active() and "nccl" in str(dist.get_backend()) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, as a new tensor on `tensor`'s device (the input is left untouched)."""
    if not (_active() and dist.get_world_size() > 1):
        return tensor.clone()
    moved = tensor.detach().to(collective_device(), copy=True)
    dist.all_reduce(moved)
    return moved.to(tensor.device)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum over ranks, as a new tensor on `tensor`'s device."""
    if not (_active() and dist.get_world_size() > 1):
        return tensor.clone()
    moved = tensor.detach().to(collective_device(), copy=True)
    dist.all_reduce(moved, op=dist.ReduceOp.MAX)
    return moved.to(tensor.device)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean over ranks, as a new tensor on `tensor`'s device (floating point)."""
    summed = all_reduce_sum(tensor if tensor.is_floating_point() else tensor.double())
    return summed / get_world_size()


def broadcast_object(value: T, src: int = 0) -> T:
    """Rank `src`'s `value` (any picklable object) on every rank."""
    if not (_active() and dist.get_world_size() > 1):
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]
