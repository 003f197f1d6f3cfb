"""torchrun worker: parallel.engine=accelerate on a tiny VAR over 2 CPU ranks (gloo).

`ddp`: Accelerate's DDP (from configs/accelerate/ddp.yaml) trains exactly as the native ddp engine
(losses and weights within 1e-5, accumulation 2 through no_sync), its checkpoint resumes exactly
(k steps, save, a fresh engine loads, continue == uninterrupted) and the native ddp engine reads
it (the same DCP layout). `deepspeed`: DeepSpeed ZeRO-2 through Accelerate's plugin
(configs/accelerate/deepspeed_zero2.yaml) against the native deepspeed engine.
Run by tests/distributed/test_accelerate.py.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch

from worker_common import log, max_difference, optim_cfg, parallel_cfg, tiny_var, train_step
from var_train.command_line import exit_process
from var_train.parallel import build_engine, destroy_distributed, init_distributed

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
TOLERANCE = 1e-5


def run(info, engine, steps, accumulation, first_step=0):
    return [train_step(engine, step, info.rank, info.world_size, accumulation)
            for step in range(first_step, first_step + steps)]


def check_matches_native(info, native: str, config: str, accumulation: int, steps: int = 3, **overrides):
    cfg = optim_cfg(info.world_size, accumulation)
    native_engine = build_engine(tiny_var(), parallel_cfg(engine=native, **overrides), cfg, info.device)
    native_losses = run(info, native_engine, steps, accumulation)
    native_state = native_engine.full_state_dict()
    engine = build_engine(tiny_var(), parallel_cfg(engine="accelerate", accelerate_config=str(CONFIGS / config),
                                                   **overrides), cfg, info.device)
    assert engine.accelerator.num_processes == info.world_size, engine.accelerator.num_processes
    losses = run(info, engine, steps, accumulation)
    loss_gap = max(abs(a - b) for a, b in zip(losses, native_losses))
    param_gap = max_difference(engine.full_state_dict(), native_state)
    assert loss_gap < TOLERANCE and param_gap < TOLERANCE, (
        f"accelerate ({config}) differs from the native {native} engine: losses {losses} vs {native_losses}, "
        f"max parameter difference {param_gap:.3g}")
    assert losses[-1] != losses[0], f"no training happened: {losses}"
    log(info.rank, f"OK accelerate {config} == native {native} (accumulation {accumulation}): "
                   f"loss gap {loss_gap:.2g}, parameter gap {param_gap:.2g}, "
                   f"distributed type {engine.accelerator.distributed_type}")
    return engine


def check_resume(info, config: str, native: str, accumulation: int = 2) -> None:
    """k steps, save, a fresh engine (and the native one) loads, continue == uninterrupted."""
    cfg = optim_cfg(info.world_size, accumulation)
    pcfg = parallel_cfg(engine="accelerate", accelerate_config=str(CONFIGS / config))
    full = build_engine(tiny_var(), pcfg, cfg, info.device)
    full_losses = run(info, full, 4, accumulation)
    full_state = full.full_state_dict()

    first = build_engine(tiny_var(), pcfg, cfg, info.device)
    run(info, first, 2, accumulation)
    root = [tempfile.mkdtemp(prefix="accelerate-resume-") if info.rank == 0 else None]
    torch.distributed.broadcast_object_list(root)
    step_dir = Path(root[0]) / "step-2"
    step_dir.mkdir(parents=True, exist_ok=True)
    first.save_state(step_dir)
    metadata = {**first.state_metadata(), "world_size": info.world_size}
    torch.distributed.barrier()
    for name, engine_cfg in (("accelerate", pcfg), (native, parallel_cfg(engine=native))):
        resumed = build_engine(tiny_var(seed=99), engine_cfg, cfg, info.device)  # other initial weights
        resumed.load_state(step_dir, metadata)
        losses = run(info, resumed, 2, accumulation, first_step=2)
        gap = max(max(abs(a - b) for a, b in zip(losses, full_losses[2:])),
                  max_difference(resumed.full_state_dict(), full_state))
        assert gap < TOLERANCE, f"{name} resumed from accelerate's step 2: {losses} vs {full_losses[2:]} (gap {gap})"
        log(info.rank, f"OK {name} resumes accelerate ({config}) step 2 exactly: gap {gap:.2g}")
    torch.distributed.barrier()  # both ranks are done reading the checkpoint (a failed check keeps it)
    if info.rank == 0:
        shutil.rmtree(root[0])


def main(which: str) -> None:
    info = init_distributed()
    assert info.world_size == 2, f"expected 2 ranks, got {info.world_size}"
    if which == "ddp":
        check_matches_native(info, "ddp", "ddp.yaml", accumulation=2)
        check_resume(info, "ddp.yaml", "ddp")
    elif which == "deepspeed":
        engine = check_matches_native(info, "deepspeed", "deepspeed_zero2.yaml", accumulation=2, zero_stage=2)
        assert engine.kind == "deepspeed" and type(engine.model).__name__ == "DeepSpeedEngine", type(engine.model)
        check_resume(info, "deepspeed_zero2.yaml", "deepspeed")
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
    exit_process(0)  # as the console scripts end: no interpreter teardown for gloo's threads to abort
