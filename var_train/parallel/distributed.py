"""Process-group set-up shared by every launcher: torchrun, accelerate launch, srun, or none.

Launchers describe the job through environment variables: torchrun and `accelerate launch` set
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a plain `srun python -m ...` sets
SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (the batch script exports MASTER_ADDR, or it is
derived from the node list). A plain `python` run with none of them is a world of one.

A process group always exists after `init_distributed()`, even for one process (backed by an
in-memory store, so no port is opened): FSDP2's device mesh and DCP then need no special case.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


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


def _int_env(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return None


def launcher_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun/accelerate variables, else Slurm's, else (0, 1, 0)."""
    world_size = _int_env("WORLD_SIZE", "SLURM_NTASKS")
    if world_size is None:
        return 0, 1, 0
    rank = _int_env("RANK", "SLURM_PROCID") or 0
    local_rank = _int_env("LOCAL_RANK", "SLURM_LOCALID") or 0
    return rank, world_size, local_rank


def _slurm_master_addr() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        raise RuntimeError("MASTER_ADDR is not set and no Slurm node list is available: export "
                           "MASTER_ADDR (the first node's host name) before starting the job")
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodes], check=True,
                               capture_output=True, text=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as error:
        raise RuntimeError(f"MASTER_ADDR is not set and `scontrol show hostnames {nodes}` failed "
                           f"({error}); export MASTER_ADDR in the batch script") from error
    return hosts[0]


def default_device(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def init_distributed(backend: str | None = None, timeout: timedelta = timedelta(minutes=30)) -> DistributedInfo:
    """Join (or create) the default process group; idempotent.

    Backend: NCCL for CUDA tensors plus gloo for CPU tensors on a GPU machine (checkpoint
    metadata and async saves use CPU collectives), gloo alone on a CPU machine.
    """
    rank, world_size, local_rank = launcher_ranks()
    # Libraries that read the torchrun variables themselves (DeepSpeed asserts LOCAL_RANK) must
    # see the same values under srun or in a plain single process.
    for name, value in (("RANK", rank), ("WORLD_SIZE", world_size), ("LOCAL_RANK", local_rank)):
        os.environ.setdefault(name, str(value))
    device = default_device(local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return DistributedInfo(dist.get_rank(), dist.get_world_size(), local_rank, device,
                               str(dist.get_backend()))
    backend = backend or ("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    if world_size == 1 and "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = _slurm_master_addr()
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                                timeout=timeout)
    return DistributedInfo(rank, world_size, local_rank, device, backend)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
