"""torchrun worker: the real Trainer with a warm start, frozen parameters and an EMA; rank 0 writes
what the optimizer and the gradients look like afterwards as JSON (argv[1]); the rest of argv are
recipe overrides for recipes/tiny.yaml."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from var_train.command_line import exit_process  # noqa: E402
from var_train.config import load_config  # noqa: E402
from var_train.parallel import destroy_distributed  # noqa: E402
from var_train.train import Trainer  # noqa: E402


def main() -> None:
    out, overrides = sys.argv[1], sys.argv[2:]
    root = Path(__file__).resolve().parents[2]
    trainer = Trainer(load_config(root / "recipes" / "tiny.yaml", overrides))
    assert trainer.world_size == 2 == dist.get_world_size(), trainer.world_size
    result = trainer.fit()
    engine = trainer.engine
    params = dict(engine.unwrapped_model.named_parameters())
    frozen = {name for name, p in params.items() if not p.requires_grad}
    if engine.name == "deepspeed":  # ZeRO-1/2 manages (flattens, keeps AdamW state for) these
        managed = {id(p) for group in engine.ds.optimizer.bit16_groups for p in group}
        with_state = {name for name, p in params.items() if id(p) in managed}
    else:
        in_groups = {id(p) for group in engine.optimizer.param_groups for p in group["params"]}
        with_state = {name for name, p in params.items()
                      if id(p) in in_groups and "exp_avg" in engine.optimizer.state.get(p, {})}

    # One more micro-batch's backward: which parameters receive gradients?
    batch = trainer._next_batch()
    with torch.no_grad():
        teacher_input = trainer.quantizer.tokens_to_teacher_input(batch.tokens_per_scale)
    with engine.micro_batch(sync=True):
        with engine.autocast():
            logits = engine.model(batch.labels, teacher_input)
        engine.backward(logits.float().logsumexp(-1).mean())
    if engine.name == "deepspeed":
        with_grad = {name for name, p in params.items() if p.requires_grad}  # reduced into ZeRO's buffers
        frozen_grads = [name for name in frozen if params[name].grad is not None]
    else:
        with_grad = {name for name, p in params.items() if p.grad is not None}
        frozen_grads = [name for name in frozen if params[name].grad is not None]
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({
            "world_size": dist.get_world_size(), "exit_code": result.exit_code, "step": result.step,
            "engine": engine.name, "frozen": sorted(frozen), "with_state": sorted(with_state),
            "with_grad": sorted(with_grad), "frozen_grads": sorted(frozen_grads), "all": sorted(params),
            "ema_updates": trainer.ema.updates if trainer.ema is not None else None,
        }))
    dist.barrier()
    destroy_distributed()

if __name__ == "__main__":
    main()
    exit_process(0)  # as the console scripts end: no interpreter teardown for gloo's threads to abort
