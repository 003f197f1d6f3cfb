"""Who am I in the job: rank, world size, local rank, rendezvous and device from the launcher's environment.

One pure function, `launch_env(environ, ...)`, for every launcher (no torch, no subprocess, no
`scontrol`), so the rules for N nodes x M tasks are unit-tested on plain dictionaries:

* torchrun / `accelerate launch` (also when started inside an srun step): RANK, WORLD_SIZE,
  LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
* an srun job step (`srun python -m ...`, one task per GPU): SLURM_PROCID, SLURM_STEP_NUM_TASKS,
  SLURM_LOCALID, SLURM_NODEID, SLURM_STEP_TASKS_PER_NODE, SLURM_STEP_NODELIST. Only the
  `SLURM_STEP_*` variables describe the step: the batch shell also has SLURM_NTASKS and
  SLURM_PROCID=0, and a process started there without srun is a world of one, not rank 0 of a
  world that never comes (it would wait for the other ranks forever).
* anything else (plain `python`, the batch shell): rank 0 of 1.

Under srun the master is the first host of the step's node list (expanded here, ranges and
zero padding included, e.g. `gpu[001-004,010]`), and the port is derived from the job and step
ids, outside the kernel's ephemeral port range (where outgoing connections take their local
ports, so a derived port there can be taken already). MASTER_ADDR / MASTER_PORT exported by the
user win.

The device index is the CUDA ordinal among the devices this process can see, whatever the GPU
binding: every task sees all GPUs of its node -> LOCAL_RANK; each task sees one (`--gpus-per-task=1`,
`--gpu-bind=single:1`) -> 0; tasks bound to groups of GPUs -> LOCAL_RANK modulo the group size.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
DEFAULT_EPHEMERAL_RANGE = (32768, 60999)  # Linux's default
LOWEST_DERIVED_PORT = 10000  # below are many well-known and registered services
DEFAULT_MASTER_PORT = 29500  # torchrun's default, for a world without a job id


@dataclass(frozen=True)
class LaunchEnv:
    launcher: str              # "torchrun" (also accelerate), "srun" or "single"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str | None    # None for a world of one (no rendezvous needed)
    master_port: int | None
    device_index: int | None   # CUDA ordinal among the visible devices; None without a GPU
    cpus_per_task: int | None  # for OMP_NUM_THREADS; None when the launcher does not say

    def exports(self) -> dict[str, str]:
        """The torchrun variables for this process (libraries such as DeepSpeed read them)."""
        values = {"RANK": self.rank, "WORLD_SIZE": self.world_size, "LOCAL_RANK": self.local_rank,
                  "LOCAL_WORLD_SIZE": self.local_world_size}
        if self.master_addr is not None:
            values |= {"MASTER_ADDR": self.master_addr, "MASTER_PORT": self.master_port}
        return {name: str(value) for name, value in values.items()}


# -- Slurm's compact lists ----------------------------------------------------------------------
def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: 'a[1,3],b' -> ['a[1,3]', 'b']."""
    parts, depth, current = [], 0, []
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {text!r}")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise ValueError(f"unbalanced '[' in host list {text!r}")
    parts.append("".join(current))
    return [part for part in parts if part]


def _expand_range_set(body: str, hostlist: str) -> list[str]:
    values = []
    for item in body.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not match:
            raise ValueError(f"bad range {item!r} in host list {hostlist!r}")
        first, last = match.group(1), match.group(2) or match.group(1)
        if int(last) < int(first):
            raise ValueError(f"descending range {item!r} in host list {hostlist!r}")
        width = len(first)  # Slurm keeps the zero padding of the first bound: 001-010
        values.extend(str(n).zfill(width) for n in range(int(first), int(last) + 1))
    return values


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compact host list -> host names, in order (what `scontrol show hostnames` prints).

    'gpu[001-004,010]' -> gpu001..gpu004, gpu010; 'a[1-2]-ib[3-4]' -> a1-ib3, a1-ib4, a2-ib3, a2-ib4.
    """
    hosts: list[str] = []
    for part in _split_top_level(hostlist.strip()):
        expanded = [""]
        for literal, body in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", part):
            if body:
                expanded = [prefix + literal + value for prefix in expanded
                            for value in _expand_range_set(body, hostlist)]
            else:
                expanded = [prefix + literal for prefix in expanded]
        hosts.extend(expanded)
    return hosts


def expand_counts(counts: str) -> list[int]:
    """Slurm's per-node counts: '4(x2),2' -> [4, 4, 2] (SLURM_STEP_TASKS_PER_NODE, SLURM_JOB_CPUS_PER_NODE)."""
    values: list[int] = []
    for item in counts.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not match:
            raise ValueError(f"bad per-node count {item!r} in {counts!r}")
        values.extend([int(match.group(1))] * int(match.group(2) or 1))
    return values


# -- ports --------------------------------------------------------------------------------------
def read_ephemeral_range(path: str | Path = EPHEMERAL_RANGE_FILE) -> tuple[int, int]:
    """The kernel's ephemeral (outgoing) port range; Linux's default where it cannot be read."""
    try:
        low, high = (int(value) for value in Path(path).read_text().split()[:2])
        return low, high
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL_RANGE


def derived_port(job_id: int, step_id: int = 0, ephemeral: tuple[int, int] = DEFAULT_EPHEMERAL_RANGE) -> int:
    """A port fixed by (job, step): the same on every task of the step, different for neighbouring
    jobs and steps, never inside the ephemeral range [low, high]."""
    low, high = ephemeral
    # The wider of the two windows around the ephemeral range, within [LOWEST_DERIVED_PORT, 65535].
    below = (LOWEST_DERIVED_PORT, low - 1)
    above = (max(high + 1, LOWEST_DERIVED_PORT), 65535)
    first, last = max((below, above), key=lambda window: window[1] - window[0])
    if last < first:
        raise ValueError(f"no port outside the ephemeral range {low}-{high}: export MASTER_PORT")
    return first + (job_id * 97 + step_id) % (last - first + 1)


# -- the environment ----------------------------------------------------------------------------
def _int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name, "")
    if value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def device_index(local_rank: int, num_visible_gpus: int) -> int | None:
    """The CUDA ordinal for this task among the GPUs it can see (see the module docstring)."""
    if num_visible_gpus <= 0:
        return None
    return local_rank % num_visible_gpus


def _cpus_per_task(environ: Mapping[str, str], node_rank: int, local_world_size: int) -> int | None:
    # Slurm >= 22.05 passes --cpus-per-task to srun only through SRUN_CPUS_PER_TASK.
    for name in ("SLURM_CPUS_PER_TASK", "SRUN_CPUS_PER_TASK"):
        value = _int(environ, name)
        if value:
            return value
    per_node = environ.get("SLURM_JOB_CPUS_PER_NODE")
    if per_node and local_world_size > 0:
        counts = expand_counts(per_node)
        if node_rank < len(counts):
            return max(1, counts[node_rank] // local_world_size)
    return None


def launch_env(environ: Mapping[str, str] | None = None, *, num_visible_gpus: int = 0,
               ephemeral_range: tuple[int, int] | None = None) -> LaunchEnv:
    """Describe this process from `environ` (default: os.environ); see the module docstring.

    `num_visible_gpus` is what this process can see (torch.cuda.device_count()); the ephemeral
    range defaults to the kernel's.
    """
    env = os.environ if environ is None else environ
    if _int(env, "WORLD_SIZE") is not None:
        world_size = _int(env, "WORLD_SIZE")
        rank = _int(env, "RANK") or 0
        local_rank = _int(env, "LOCAL_RANK") or 0
        local_world_size = _int(env, "LOCAL_WORLD_SIZE") or world_size
        node_rank = _int(env, "GROUP_RANK") or rank // max(1, local_world_size)
        master_addr = env.get("MASTER_ADDR") or ("127.0.0.1" if world_size > 1 else None)
        master_port = _int(env, "MASTER_PORT") or (DEFAULT_MASTER_PORT if master_addr else None)
        launcher = "torchrun"
    elif _int(env, "SLURM_STEP_NUM_TASKS") is not None:
        world_size = _int(env, "SLURM_STEP_NUM_TASKS")
        rank = _int(env, "SLURM_PROCID") or 0
        local_rank = _int(env, "SLURM_LOCALID") or 0
        node_rank = _int(env, "SLURM_NODEID") or 0
        per_node = expand_counts(env.get("SLURM_STEP_TASKS_PER_NODE") or str(world_size))
        local_world_size = per_node[node_rank] if node_rank < len(per_node) else per_node[-1]
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
        master_addr = env.get("MASTER_ADDR") or (expand_hostlist(nodelist)[0] if nodelist else None)
        if master_addr is None and world_size > 1:
            raise ValueError("an srun step without SLURM_STEP_NODELIST: export MASTER_ADDR")
        master_port = _int(env, "MASTER_PORT")
        if master_port is None:
            ephemeral = ephemeral_range or read_ephemeral_range()
            master_port = derived_port(_int(env, "SLURM_JOB_ID") or 0, _int(env, "SLURM_STEP_ID") or 0, ephemeral)
        launcher = "srun"
    else:
        return LaunchEnv("single", 0, 1, 0, 1, 0, env.get("MASTER_ADDR"), _int(env, "MASTER_PORT"),
                         device_index(0, num_visible_gpus), _cpus_per_task(env, 0, 1))
    if not 0 <= rank < world_size or not 0 <= local_rank < local_world_size:
        raise ValueError(f"{launcher}: rank {rank} / local rank {local_rank} outside world size "
                         f"{world_size} / local world size {local_world_size}")
    return LaunchEnv(launcher, rank, world_size, local_rank, local_world_size, node_rank, master_addr,
                     master_port, device_index(local_rank, num_visible_gpus),
                     _cpus_per_task(env, node_rank, local_world_size))

