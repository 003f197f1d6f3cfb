"""A real single-process training run (the Trainer, no launcher) that also records, after every
step, each AdamW group's name, learning rate and weight decay as the optimizer holds them.

Usage: schedule_worker.py OUT_JSON RECIPE [key=value ...]   (run by test_schedule_in_a_run.py)
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from var_train.command_line import exit_process  # noqa: E402
from var_train.config import load_config  # noqa: E402
from var_train.parallel import destroy_distributed  # noqa: E402
from var_train.train import Trainer  # noqa: E402


def main(out_json: str, recipe: str, *overrides: str) -> None:
    trainer = Trainer(load_config(recipe, overrides))
    assert trainer.world_size == 1, trainer.world_size
    groups_per_step = []
    train_step = trainer.train_step

    def recording_step():
        out = train_step()
        groups_per_step.append([{"name": g.get("name"), "lr": g["lr"], "weight_decay": g["weight_decay"],
                                 "num_params": sum(p.numel() for p in g["params"])}
                                for g in trainer.engine.optimizer.param_groups])
        return out

    trainer.train_step = recording_step
    result = trainer.fit()
    Path(out_json).write_text(json.dumps({"exit_code": result.exit_code, "steps_per_epoch": trainer.steps_per_epoch,
                                          "groups": groups_per_step}))
    # The recording wrapper makes a reference cycle: collect the trainer now, so its data loader
    # shuts its worker processes down before the interpreter exits.
    del trainer, train_step, recording_step
    gc.collect()
    destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_process(0)  # as the console scripts end: no interpreter teardown for gloo's threads to abort
