"""Engines on 2 CPU ranks (gloo) against single-process training, plus their pure-Python parts."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import run_torchrun
from var_train.parallel import estimate_memory_per_gpu, grad_accumulation_steps
from var_train.parallel.distributed import launcher_ranks

WORKER = Path(__file__).with_name("engine_worker.py")


@pytest.mark.distributed
def test_every_engine_trains_like_a_single_process():
    output = run_torchrun(WORKER, "all", nproc=2, timeout=300).stdout
    for check in ("OK fsdp2 fp32:", "OK fsdp2 placements (Shard(dim=0),): 96 of 192 rows per rank",
                  "OK fsdp2 fp32, accumulation 2, activation checkpointing, no reshard:",
                  "OK fsdp2 HSDP replicate_degree=2:", "OK fsdp2 placements (Replicate(), Shard(dim=0))",
                  "OK fsdp2 bf16:", "OK fsdp2 wrapping order",
                  "OK ddp fp32, accumulation 2, activation checkpointing:", "OK ddp bf16:",
                  "OK deepspeed zero 2 fp32, accumulation 2:", "OK deepspeed zero 3 fp32, activation checkpointing:",
                  "OK deepspeed zero 2 bf16:", "OK fsdp2: a non-finite step is skipped",
                  "OK ddp: a non-finite step is skipped", "OK deepspeed zero 2: a non-finite step is skipped",
                  "OK fsdp2: full_model() is callable piece by piece", "OK ddp: full_model() is callable",
                  "OK deepspeed zero 3: full_model() is callable",
                  "OK fsdp2: a generic module with block_classes trains like one process",
                  "OK ddp: a generic module with block_classes trains like one process",
                  "OK fsdp2: gradients are reduced on the last micro-batch only",
                  "OK ddp: gradients are reduced on the last micro-batch only"):
        assert check in output, f"missing check {check!r} in:\n{output}"


def test_every_engine_runs_in_a_plain_single_process():
    import os
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, str(WORKER), "single"], env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for engine in ("fsdp2", "ddp", "deepspeed"):
        assert f"OK {engine} in a plain single process" in proc.stdout, proc.stdout


def test_no_weight_decay_on_vectors_biases_positions_levels_and_temperatures():
    from tests.distributed.worker_common import tiny_var

    model = tiny_var()
    decay, no_decay = model.parameter_groups(0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["name"] == "decay" and decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {"pos_start", "pos_1LC", "lvl_embed.weight", "blocks.0.attn.scale_mul_1H11", "blocks.0.attn.q_bias",
            "blocks.0.attn.v_bias", "blocks.1.ffn.fc1.bias", "head.bias", "word_embed.bias"} <= kept
    assert {"class_emb.weight", "word_embed.weight", "blocks.0.attn.mat_qkv.weight", "blocks.0.attn.proj.weight",
            "blocks.0.ffn.fc2.weight", "blocks.0.ada_lin.1.weight", "head.weight",
            "head_nm.ada_lin.1.weight"} <= decayed
    assert decayed.isdisjoint(kept) and len(decayed) + len(kept) == len(names)


def test_grad_accumulation_steps_checks_divisibility():
    cfg = SimpleNamespace(global_batch_size=768, micro_batch_size=24)
    assert grad_accumulation_steps(cfg, 16) == 2
    with pytest.raises(ValueError, match="not a multiple"):
        grad_accumulation_steps(cfg, 5)


def test_launcher_ranks_from_torchrun_then_slurm(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS",
                 "SLURM_LOCALID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_TASKS_PER_NODE", "SLURM_NODEID",
                 "SLURM_STEP_NODELIST"):
        monkeypatch.delenv(name, raising=False)
    assert launcher_ranks() == (0, 1, 0)
    for name, value in (("SLURM_PROCID", "5"), ("SLURM_NTASKS", "8"), ("SLURM_LOCALID", "1")):
        monkeypatch.setenv(name, value)
    assert launcher_ranks() == (0, 1, 0)  # the batch shell: no srun step, a world of one
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")  # inside `srun`
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[01-02]")
    assert launcher_ranks() == (5, 8, 1)
    for name, value in (("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "3")):
        monkeypatch.setenv(name, value)
    assert launcher_ranks() == (3, 4, 3)  # torchrun inside an allocation wins


def _parallel(**overrides):
    from var_train.config import ParallelConfig

    return ParallelConfig(**{"engine": "fsdp2", "precision": "bf16", **overrides})


def test_memory_estimate_follows_sharding_and_checkpointing():
    import torch

    from var_train.models import VAR

    with torch.device("meta"):
        model = VAR(depth=16)
    assert sum(p.numel() for p in model.parameters()) == 310_283_520  # REFERENCE.md
    d16 = dict(model=model, micro_batch_size=32)
    ddp = estimate_memory_per_gpu(parallel_cfg=_parallel(engine="ddp"), world_size=16, **d16)
    fsdp = estimate_memory_per_gpu(parallel_cfg=_parallel(), world_size=16, **d16)
    hsdp = estimate_memory_per_gpu(parallel_cfg=_parallel(replicate_degree=2), world_size=16, **d16)
    zero2 = estimate_memory_per_gpu(parallel_cfg=_parallel(engine="deepspeed"), world_size=16, **d16)
    checkpointed = estimate_memory_per_gpu(parallel_cfg=_parallel(activation_checkpointing=True), world_size=16, **d16)
    assert set(ddp) == {"params", "grads", "optimizer_states", "activations", "total"}
    assert ddp["optimizer_states"] == pytest.approx(8 * 310_283_520)
    assert fsdp["optimizer_states"] == pytest.approx(ddp["optimizer_states"] / 16)
    assert fsdp["optimizer_states"] < hsdp["optimizer_states"] < ddp["optimizer_states"]
    assert zero2["params"] == ddp["params"] and zero2["grads"] < ddp["grads"]
    assert checkpointed["activations"] < fsdp["activations"] / 3
    assert fsdp["total"] == pytest.approx(sum(v for k, v in fsdp.items() if k != "total"))
    # d16 at 32 images per GPU: tens of GiB of activations without checkpointing, as on A100s.
    assert 10 * 2**30 < fsdp["activations"] < 60 * 2**30
