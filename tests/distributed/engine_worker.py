"""torchrun worker: every engine on a tiny VAR over 2 CPU ranks (gloo).

Checks that each engine's training equals the same training in one process on the whole global
batch (fp32, within 1e-5), that FSDP2 really shards (half the rows of each block weight per rank,
DTensor Shard(0)) and HSDP replicates, and that the bf16 variants train (loss falls on a fixed
batch). Run by tests/distributed/test_engines.py.
"""

from __future__ import annotations

import sys
import time

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from worker_common import (log, max_difference, optim_cfg, parallel_cfg, reference_steps, tiny_var,
                           train_step)
from var_train.parallel import build_engine, destroy_distributed, init_distributed

STEPS = 3
TOLERANCE = 1e-5


def check_matches_reference(info, name: str, accumulation: int, **parallel_overrides) -> None:
    started = time.perf_counter()
    engine = build_engine(tiny_var(), parallel_cfg(**parallel_overrides), optim_cfg(info.world_size, accumulation),
                          info.device)
    losses = [train_step(engine, step, info.rank, info.world_size, accumulation) for step in range(STEPS)]
    state = engine.full_state_dict()
    ref_losses, ref_state = reference_steps(STEPS, info.world_size, accumulation)
    loss_gap = max(abs(a - b) for a, b in zip(losses, ref_losses))
    param_gap = max_difference(state, ref_state)
    assert loss_gap < TOLERANCE and param_gap < TOLERANCE, (
        f"{name}: differs from single-process training: losses {losses} vs {ref_losses}, "
        f"max parameter difference {param_gap:.3g}")
    log(info.rank, f"OK {name}: matches the single-process reference (loss gap {loss_gap:.2g}, "
                   f"parameter gap {param_gap:.2g}, {time.perf_counter() - started:.1f}s)")
    return engine


def check_fsdp2_sharding(info, engine, placements) -> None:
    weight = engine.model.blocks[0].attn.mat_qkv.weight
    assert isinstance(weight, DTensor), f"block weight is {type(weight)}, not a DTensor"
    assert tuple(weight.placements) == placements, f"placements {weight.placements} != {placements}"
    shard_size = info.world_size // (2 if len(placements) == 2 else 1)
    rows = weight.shape[0]
    local_rows = weight.to_local().shape[0]
    assert local_rows == rows // shard_size, f"rank {info.rank} holds {local_rows} of {rows} rows"
    log(info.rank, f"OK fsdp2 placements {placements}: {local_rows} of {rows} rows per rank")


def check_wrapping_order(info) -> None:
    """activation checkpointing -> compile -> fully_shard per block -> root, and clean state names.
    (torch.compile is lazy: nothing is compiled unless the model runs.)"""
    from torch._dynamo.eval_frame import OptimizedModule
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import FSDPModule

    engine = build_engine(tiny_var(), parallel_cfg(activation_checkpointing=True, compile=True),
                          optim_cfg(info.world_size), info.device)
    block = engine.model.blocks[0]
    assert isinstance(engine.model, FSDPModule) and isinstance(block, FSDPModule), type(block)
    assert isinstance(block, OptimizedModule) and isinstance(block._orig_mod, CheckpointWrapper), type(block)
    model_state, _ = engine.dcp_state()
    assert set(model_state) == set(tiny_var().state_dict()), sorted(model_state)[:5]
    log(info.rank, "OK fsdp2 wrapping order: FSDP(compile(checkpoint(block))); state names stay clean")


def check_loss_falls(info, name: str, **parallel_overrides) -> None:
    engine = build_engine(tiny_var(), parallel_cfg(**parallel_overrides), optim_cfg(info.world_size), info.device)
    seen = []  # dtype of a block's weight and of its matmul output inside the forward
    linear = engine.unwrapped_model.blocks[0].attn.proj
    handle = linear.register_forward_hook(lambda module, args, out: seen.append((module.weight.dtype, out.dtype)))
    losses = [train_step(engine, 0, info.rank, info.world_size, 1, fixed=True) for _ in range(6)]
    handle.remove()
    assert seen and all(out == torch.bfloat16 for _, out in seen), f"{name}: block matmuls ran in {seen[0]}"
    if parallel_overrides.get("engine", "fsdp2") == "fsdp2":
        assert seen[0][0] == torch.bfloat16, f"{name}: FSDP2 gathered {seen[0][0]} block weights, not bf16"
    assert all(torch.isfinite(torch.tensor(losses))), f"{name}: non-finite loss {losses}"
    assert losses[-1] < losses[0] - 0.05, f"{name}: loss did not fall on a fixed batch: {losses}"
    for param in engine.optimizer.param_groups[0]["params"]:
        assert param.dtype == torch.float32, f"{name}: master parameter in {param.dtype}"
    log(info.rank, f"OK {name}: loss {losses[0]:.3f} -> {losses[-1]:.3f} on a fixed batch")


def check_nonfinite_step_is_skipped(info, name: str, **parallel_overrides) -> None:
    """A NaN loss gives a non-finite norm; skipping optimizer_step then leaves the weights as they
    were, and the next step trains normally."""
    from worker_common import loss_fn, micro_batches

    engine = build_engine(tiny_var(), parallel_cfg(**parallel_overrides), optim_cfg(info.world_size), info.device)
    train_step(engine, 0, info.rank, info.world_size, 1)
    before = engine.full_state_dict()
    labels, teacher_input, targets = micro_batches(1, info.rank, info.world_size, 1)[0]
    with engine.autocast():
        logits = engine.model(labels, teacher_input)
    engine.backward(loss_fn(logits.float(), targets) * float("nan"), sync_gradients=True)
    norm = engine.clip_grad_norm(2.0)
    assert not torch.isfinite(norm), f"{name}: gradient norm {norm} of a NaN loss"
    engine.zero_grad()  # the trainer skips optimizer_step
    assert max_difference(engine.full_state_dict(), before) == 0.0, f"{name}: a skipped step changed the weights"
    loss = train_step(engine, 2, info.rank, info.world_size, 1)
    assert loss == loss and max_difference(engine.full_state_dict(), before) > 0, f"{name}: no recovery"
    log(info.rank, f"OK {name}: a non-finite step is skipped and training goes on")


def single_process() -> None:
    """A plain `python` run without any launcher: a world of one, every engine still works."""
    import os

    assert "RANK" not in os.environ and "MASTER_ADDR" not in os.environ, "started by a launcher"
    info = init_distributed()
    assert (info.rank, info.world_size) == (0, 1), info
    for engine in ("fsdp2", "ddp", "deepspeed"):
        check_matches_reference(info, f"{engine} in a plain single process", 1, engine=engine)


def main(which: str) -> None:
    if which == "single":
        single_process()
        return destroy_distributed()
    info = init_distributed()
    assert info.world_size == 2, f"expected 2 ranks, got {info.world_size}"
    if which in ("all", "fsdp2"):
        engine = check_matches_reference(info, "fsdp2 fp32", 1)
        check_fsdp2_sharding(info, engine, (Shard(0),))
        check_matches_reference(info, "fsdp2 fp32, accumulation 2, activation checkpointing, no reshard", 2,
                                activation_checkpointing=True, reshard_after_forward=False)
        engine = check_matches_reference(info, "fsdp2 HSDP replicate_degree=2", 1, replicate_degree=2)
        check_fsdp2_sharding(info, engine, (Replicate(), Shard(0)))
        check_loss_falls(info, "fsdp2 bf16", precision="bf16")
        check_wrapping_order(info)
        check_nonfinite_step_is_skipped(info, "fsdp2")
    if which in ("all", "ddp"):
        check_matches_reference(info, "ddp fp32, accumulation 2, activation checkpointing", 2, engine="ddp",
                                activation_checkpointing=True)
        check_loss_falls(info, "ddp bf16", engine="ddp", precision="bf16")
        check_nonfinite_step_is_skipped(info, "ddp", engine="ddp")
    if which in ("all", "deepspeed"):
        check_matches_reference(info, "deepspeed zero 2 fp32, accumulation 2", 2, engine="deepspeed", zero_stage=2)
        check_matches_reference(info, "deepspeed zero 3 fp32, activation checkpointing", 1, engine="deepspeed",
                                zero_stage=3, activation_checkpointing=True)
        check_loss_falls(info, "deepspeed zero 2 bf16", engine="deepspeed", zero_stage=2, precision="bf16")
        check_nonfinite_step_is_skipped(info, "deepspeed zero 2", engine="deepspeed", zero_stage=2)
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "all")
