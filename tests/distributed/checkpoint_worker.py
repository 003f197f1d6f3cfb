"""torchrun worker: checkpoints of every engine on a tiny VAR (gloo, CPU).

    checkpoint_worker.py save-resume OUT_DIR   (2 ranks)
        per engine: train, save, keep training (the uninterrupted run); then a fresh engine from a
        different initialisation resumes from the checkpoint and must reproduce parameters,
        optimizer state, RNG draws and the continued training exactly; plus atomicity (an
        interrupted save is ignored), keep_last retention and an asynchronous save. Leaves the
        checkpoints and the expected full state dicts in OUT_DIR for the export tests.
    checkpoint_worker.py reshard OUT_DIR       (1 rank)
        loads the 2-rank FSDP2 checkpoint (into fsdp2, then ddp) and checks parameters and optimizer.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from worker_common import (checkpoint_cfg, log, max_difference, optim_cfg, parallel_cfg, tiny_var,
                           train_step)
from var_train.checkpoint import Checkpointer, complete_checkpoints, latest_checkpoint
from var_train.command_line import exit_process
from var_train.parallel import build_engine, destroy_distributed, init_distributed

SAVE_AT, TOTAL_STEPS = 2, 4
TOLERANCE = 1e-6
ENGINES = {
    "fsdp2": dict(engine="fsdp2"),
    "ddp": dict(engine="ddp"),
    "deepspeed": dict(engine="deepspeed", zero_stage=3),
}


def full_optimizer_state(engine) -> dict[str, torch.Tensor]:
    """Every AdamW moment and step as full tensors, keyed by parameter name."""
    if engine.name == "deepspeed":
        return {}
    state = get_optimizer_state_dict(engine.model, engine.optimizer, options=StateDictOptions(full_state_dict=True))
    return {f"{name}.{key}": torch.as_tensor(value).detach().clone()
            for name, per_param in state["state"].items() for key, value in per_param.items()}


def random_draws() -> tuple:
    return torch.rand(3).tolist(), random.random(), float(np.random.rand())


def build(info, name: str, seed: int = 0):
    return build_engine(tiny_var(seed), parallel_cfg(**ENGINES[name]), optim_cfg(info.world_size), info.device)


def save_and_resume(info, name: str, run_dir: Path, out_dir: Path) -> None:
    world, rank = info.world_size, info.rank
    ckpt = Checkpointer(checkpoint_cfg(keep_last=0), run_dir)
    assert ckpt.load_latest(build(info, name)) is None, "found a checkpoint in an empty run directory"

    # The uninterrupted run, saving at SAVE_AT.
    engine = build(info, name)
    for step in range(SAVE_AT):
        train_step(engine, step, rank, world, 1)
    trainer_state = {"step": SAVE_AT, "loader": {"epoch": 0, "batches_consumed": SAVE_AT}, "wandb_run_id": "abc123"}
    ckpt.save(SAVE_AT, engine, trainer_state)
    saved_params, saved_optimizer = engine.full_state_dict(), full_optimizer_state(engine)
    draws_after_save = random_draws()
    for step in range(SAVE_AT, TOTAL_STEPS):
        train_step(engine, step, rank, world, 1)
    final_params = engine.full_state_dict()
    if rank == 0:
        torch.save(saved_params, out_dir / f"expected-{name}.pt")

    # A fresh process would start from another initialisation and other RNG states.
    torch.manual_seed(999), random.seed(999), np.random.seed(999)
    resumed = build(info, name, seed=7)
    assert max_difference(resumed.full_state_dict(), saved_params) > 1e-3, "the fresh engine already matches"
    restored = Checkpointer(checkpoint_cfg(), run_dir).load_latest(resumed)
    assert restored == trainer_state, f"trainer state {restored} != {trainer_state}"
    gap = max_difference(resumed.full_state_dict(), saved_params)
    assert gap == 0.0, f"{name}: resumed parameters differ by {gap}"
    if saved_optimizer:
        gap = max_difference(full_optimizer_state(resumed), saved_optimizer)
        assert gap == 0.0, f"{name}: resumed optimizer state differs by {gap}"
    assert random_draws() == draws_after_save, f"{name}: RNG states were not restored on rank {rank}"
    for step in range(SAVE_AT, TOTAL_STEPS):
        train_step(resumed, step, rank, world, 1)
    gap = max_difference(resumed.full_state_dict(), final_params)
    assert gap <= TOLERANCE, f"{name}: resumed training diverges from the uninterrupted run by {gap}"
    log(rank, f"OK {name}: resume restores parameters, optimizer, RNG; continued training matches (gap {gap:.2g})")


def interrupted_save_is_ignored(info, run_dir: Path) -> None:
    class CrashBeforeRename(Checkpointer):
        def _finalize(self, tmp, final, metadata):  # the job dies after writing, before the rename
            torch.distributed.barrier()

    engine = build(info, "fsdp2")
    train_step(engine, 0, info.rank, info.world_size, 1)
    CrashBeforeRename(checkpoint_cfg(), run_dir).save(9, engine, {"step": 9})
    leftovers = list((run_dir / "checkpoints").glob(".tmp-*"))
    assert leftovers, "the interrupted save left no temporary directory behind"
    newest = latest_checkpoint(run_dir / "checkpoints")
    assert newest is not None and newest.name == f"step-{SAVE_AT:08d}", f"newest complete checkpoint: {newest}"
    state = Checkpointer(checkpoint_cfg(), run_dir).load_latest(build(info, "fsdp2"))
    assert state["step"] == SAVE_AT, f"load_latest picked step {state['step']}, not the last complete {SAVE_AT}"
    # A crashed save's leftovers are removed when the next checkpointer starts (they could keep a full disk full).
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "the interrupted save's leftovers were kept"
    log(info.rank, "OK an interrupted save is ignored by load_latest")


def retention_and_async(info, run_dir: Path) -> None:
    ckpt = Checkpointer(checkpoint_cfg(keep_last=2, async_save=True), run_dir)
    engine = build(info, "fsdp2")
    expected = None
    for step in range(3):
        train_step(engine, step, info.rank, info.world_size, 1)
        ckpt.save(10 + step, engine, {"step": 10 + step})
        expected = engine.full_state_dict()
        # Training goes on while the files are written: they must hold the state at save time.
        train_step(engine, 100 + step, info.rank, info.world_size, 1)
    ckpt.wait()
    names = [p.name for p in complete_checkpoints(run_dir / "checkpoints")]
    assert names == ["step-00000011", "step-00000012"], f"keep_last=2 left {names}"
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "temporary directories were left behind"
    resumed = build(info, "fsdp2", seed=3)
    state = Checkpointer(checkpoint_cfg(), run_dir).load_latest(resumed)
    assert state == {"step": 12}, state
    gap = max_difference(resumed.full_state_dict(), expected)
    assert gap == 0.0, f"the asynchronous checkpoint differs from the state at save time by {gap}"
    # Saving a step that already has a checkpoint (e.g. again after a resume) replaces it.
    ckpt.save(12, engine, {"step": 12, "again": True}, blocking=True)
    state = Checkpointer(checkpoint_cfg(), run_dir).load_latest(resumed)
    assert state == {"step": 12, "again": True}, state
    assert max_difference(resumed.full_state_dict(), engine.full_state_dict()) == 0.0
    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")] == names
    log(info.rank, f"OK keep_last=2 keeps {names}; async save holds the state at save time")


def reshard(info, out_dir: Path) -> None:
    assert info.world_size == 1, f"expected 1 rank, got {info.world_size}"
    engine = build(info, "fsdp2", seed=5)
    state = Checkpointer(checkpoint_cfg(), out_dir / "fsdp2").load_latest(engine)
    assert state["step"] == SAVE_AT, state
    expected = torch.load(out_dir / "expected-fsdp2.pt", weights_only=True)
    gap = max_difference(engine.full_state_dict(), expected)
    assert gap == 0.0, f"the 2-rank checkpoint loads on 1 rank with a parameter difference of {gap}"
    moments = full_optimizer_state(engine)
    assert moments and all(torch.isfinite(v).all() for v in moments.values())
    assert any(k.endswith("exp_avg") and v.abs().sum() > 0 for k, v in moments.items()), "optimizer moments are empty"
    train_step(engine, SAVE_AT, 0, 1, 1)  # and training goes on, on one rank
    # DCP state has the same names and global shapes under every DCP engine: DDP reads it too.
    # (and `checkpoint.resume` may name another run's checkpoint)
    ddp = build(info, "ddp", seed=6)
    Checkpointer(checkpoint_cfg(resume=str(out_dir / "fsdp2")), out_dir / "new-run").load_latest(ddp)
    gap = max_difference(ddp.full_state_dict(), expected)
    assert gap == 0.0, f"the fsdp2 checkpoint loads into ddp with a parameter difference of {gap}"
    # DeepSpeed's ZeRO partitions are tied to their world size: a clear error, not a bad load.
    try:
        Checkpointer(checkpoint_cfg(), out_dir / "deepspeed").load_latest(build(info, "deepspeed"))
    except ValueError as error:
        assert "resume it on 2 ranks, not 1" in str(error), error
    else:
        raise AssertionError("a 2-rank DeepSpeed checkpoint loaded on 1 rank")
    log(0, "OK a 2-rank fsdp2 checkpoint loads on 1 rank with identical parameters (fsdp2 and ddp)")


def main(mode: str, out_dir: str) -> None:
    info = init_distributed()
    out = Path(out_dir)
    if mode == "save-resume":
        assert info.world_size == 2, f"expected 2 ranks, got {info.world_size}"
        for name in ENGINES:
            save_and_resume(info, name, out / name, out)
        interrupted_save_is_ignored(info, out / "fsdp2")
        retention_and_async(info, out / "retention")
    elif mode == "reshard":
        reshard(info, out)
    else:
        raise SystemExit(f"unknown mode {mode}")
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    exit_process(0)  # as the console scripts end: no interpreter teardown for gloo's threads to abort
