"""launch_env: rank / world / local rank / rendezvous / device from realistic launcher environments.

The environments are what Slurm 22.05 and torchrun really set (copied from `env` inside real
jobs, trimmed); the expected values are written out by hand.
"""

from __future__ import annotations

import pytest

from var_train.parallel.launch_env import (derived_port, expand_counts, expand_hostlist, launch_env,
                                           read_ephemeral_range)

EPHEMERAL = (32768, 60999)

# The batch shell of `sbatch --nodes 2 --ntasks-per-node 4`: no SLURM_STEP_* variables.
BATCH_SHELL = {
    "SLURM_JOB_ID": "81234", "SLURM_JOBID": "81234", "SLURM_JOB_NODELIST": "gpu[001-002]",
    "SLURM_NODELIST": "gpu[001-002]", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2",
    "SLURM_NTASKS": "8", "SLURM_NPROCS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_TASKS_PER_NODE": "4(x2)",
    "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_CPUS_PER_TASK": "12",
    "SLURM_JOB_CPUS_PER_NODE": "48(x2)", "SLURM_GTIDS": "0", "SLURM_SUBMIT_DIR": "/home/me/var",
}


def step_task(procid: int, localid: int, nodeid: int, **extra: str) -> dict[str, str]:
    """One task of `srun` inside the 2 x 4 allocation above."""
    return {**BATCH_SHELL, "SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_STEP_NODELIST": "gpu[001-002]",
            "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
            "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid), "SLURM_NODEID": str(nodeid), **extra}


# -- hostlists and counts ------------------------------------------------------------------------
@pytest.mark.parametrize("hostlist, hosts", [
    ("vm", ["vm"]),
    ("gpu[001-004,010]", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu010"]),
    ("node[9-11]", ["node9", "node10", "node11"]),
    ("a100-[08-09],h100-01", ["a100-08", "a100-09", "h100-01"]),
    ("rack[1-2]-n[3,5]", ["rack1-n3", "rack1-n5", "rack2-n3", "rack2-n5"]),
    ("gpu-[1-2].cluster.local", ["gpu-1.cluster.local", "gpu-2.cluster.local"]),
    ("x[099-101]", ["x099", "x100", "x101"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["gpu[001-004", "gpu]1[", "gpu[4-2]", "gpu[a-b]"])
def test_expand_hostlist_rejects_malformed(bad):
    with pytest.raises(ValueError):
        expand_hostlist(bad)


def test_expand_counts():
    assert expand_counts("4(x2)") == [4, 4]
    assert expand_counts("4(x2),2") == [4, 4, 2]
    assert expand_counts("3,1,2") == [3, 1, 2]
    with pytest.raises(ValueError):
        expand_counts("4(2)")


# -- ports ----------------------------------------------------------------------------------------
def test_derived_port_avoids_the_ephemeral_range_and_separates_jobs():
    ports = {derived_port(job, 0, EPHEMERAL) for job in range(5000)}
    assert all(10000 <= port < 32768 for port in ports)
    assert len(ports) > 4900  # neighbouring jobs (and steps) do not share a port
    assert derived_port(81234, 0, EPHEMERAL) != derived_port(81234, 1, EPHEMERAL)
    # A kernel whose ephemeral range starts low: the port goes above it.
    assert all(50000 < derived_port(job, 0, (15000, 50000)) <= 65535 for job in range(1000))
    with pytest.raises(ValueError):
        derived_port(1, 0, (1024, 65535))


def test_read_ephemeral_range(tmp_path):
    path = tmp_path / "ip_local_port_range"
    path.write_text("20000\t40000\n")
    assert read_ephemeral_range(path) == (20000, 40000)
    assert read_ephemeral_range(tmp_path / "missing") == (32768, 60999)


# -- launchers ------------------------------------------------------------------------------------
def test_plain_python_is_a_world_of_one():
    env = launch_env({}, num_visible_gpus=0)
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.master_addr, env.device_index) == \
        ("single", 0, 1, 0, None, None)


def test_the_batch_shell_is_a_world_of_one_whatever_its_slurm_ntasks():
    """`var-train eval` in a batch script without srun hung waiting for 7 ranks that never came."""
    env = launch_env(BATCH_SHELL, num_visible_gpus=8, ephemeral_range=EPHEMERAL)
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.master_addr) == ("single", 0, 1, 0, None)
    assert env.device_index == 0
    assert env.cpus_per_task == 12


def test_two_nodes_by_four_tasks_every_task_sees_all_four_gpus():
    envs = [launch_env(step_task(p, p % 4, p // 4), num_visible_gpus=4, ephemeral_range=EPHEMERAL) for p in range(8)]
    assert [e.rank for e in envs] == list(range(8))
    assert {e.world_size for e in envs} == {8} and {e.local_world_size for e in envs} == {4}
    assert [e.node_rank for e in envs] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [e.device_index for e in envs] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert {e.master_addr for e in envs} == {"gpu001"}
    assert len({e.master_port for e in envs}) == 1  # every task derives the same port
    assert 10000 <= envs[0].master_port < 32768
    assert {e.launcher for e in envs} == {"srun"}
    assert envs[5].exports() == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                                 "MASTER_ADDR": "gpu001", "MASTER_PORT": str(envs[0].master_port)}


def test_one_gpu_per_task_binding_uses_device_zero():
    """--gpus-per-task=1 / --gpu-bind=single: each task sees only its own GPU as cuda:0."""
    env = launch_env(step_task(6, 2, 1, CUDA_VISIBLE_DEVICES="2"), num_visible_gpus=1, ephemeral_range=EPHEMERAL)
    assert (env.rank, env.local_rank, env.device_index) == (6, 2, 0)


def test_gpus_bound_per_socket():
    """8 tasks per node, each bound to the 4 GPUs of its socket: local rank 5 -> the 2nd GPU it sees."""
    env = launch_env(step_task(5, 5, 0, SLURM_STEP_TASKS_PER_NODE="8", SLURM_STEP_NUM_TASKS="8",
                               SLURM_STEP_NODELIST="gpu003"), num_visible_gpus=4, ephemeral_range=EPHEMERAL)
    assert (env.local_world_size, env.device_index, env.master_addr) == (8, 1, "gpu003")


def test_heterogeneous_nodes_and_cpus_per_task():
    """A 3-node step with 4, 4 and 2 tasks; SLURM_CPUS_PER_TASK unset: CPUs of the node / its tasks."""
    base = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "2", "SLURM_STEP_NODELIST": "cn[07-08],big01",
            "SLURM_STEP_NUM_TASKS": "10", "SLURM_STEP_TASKS_PER_NODE": "4(x2),2",
            "SLURM_JOB_CPUS_PER_NODE": "32(x2),64", "SLURM_NTASKS": "99"}
    last = launch_env({**base, "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NODEID": "2"},
                      ephemeral_range=EPHEMERAL)
    assert (last.rank, last.world_size, last.local_rank, last.local_world_size, last.node_rank) == (9, 10, 1, 2, 2)
    assert last.cpus_per_task == 32 and last.master_addr == "cn07" and last.device_index is None
    first = launch_env({**base, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"},
                       ephemeral_range=EPHEMERAL)
    assert first.cpus_per_task == 8 and first.master_port == last.master_port
    # Slurm >= 22.05 hands srun the job's --cpus-per-task only through SRUN_CPUS_PER_TASK.
    bound = launch_env({**base, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                        "SRUN_CPUS_PER_TASK": "6"}, ephemeral_range=EPHEMERAL)
    assert bound.cpus_per_task == 6


def test_exported_master_wins_over_the_derived_one():
    env = launch_env(step_task(1, 1, 0, MASTER_ADDR="10.0.0.5", MASTER_PORT="23456"), ephemeral_range=EPHEMERAL)
    assert (env.master_addr, env.master_port) == ("10.0.0.5", 23456)


def test_torchrun_inside_an_allocation_wins_over_slurm():
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
                "MASTER_ADDR": "gpu001", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "x"}
    env = launch_env({**step_task(0, 0, 0), **torchrun}, num_visible_gpus=2)
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank) == \
        ("torchrun", 3, 4, 1, 2, 1)
    assert (env.master_addr, env.master_port, env.device_index) == ("gpu001", 29400, 1)


def test_accelerate_launch_single_process():
    """`accelerate launch` with one process sets the torchrun variables for a world of one."""
    env = launch_env({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, num_visible_gpus=1)
    assert (env.rank, env.world_size, env.device_index) == (0, 1, 0)


def test_inconsistent_environment_is_an_error():
    with pytest.raises(ValueError, match="outside world size"):
        launch_env(step_task(8, 0, 1), ephemeral_range=EPHEMERAL)
    with pytest.raises(ValueError, match="not an integer"):
        launch_env({"WORLD_SIZE": "two"})


def test_single_task_srun_step():
    env = launch_env({**BATCH_SHELL, "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_TASKS_PER_NODE": "1",
                      "SLURM_STEP_NODELIST": "gpu001", "SLURM_STEP_ID": "3"}, ephemeral_range=EPHEMERAL)
    assert (env.launcher, env.rank, env.world_size) == ("srun", 0, 1)
