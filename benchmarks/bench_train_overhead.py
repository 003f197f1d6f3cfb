"""Share of a training step spent outside forward/backward/optimizer, logging included.

  PYTHONPATH=. python benchmarks/bench_train_overhead.py --recipe recipes/demo.yaml --steps 10
  PYTHONPATH=. python benchmarks/bench_train_overhead.py --recipe recipes/tiny.yaml --log-every 1

Times, in one process and interleaved round by round, (a) what `Trainer.fit` does per step:
`train_step` (loader, teacher input, loss statistics and their all-reduce, the engine step),
the console + JSONL log line every `--log-every` steps (W&B disabled: its writes happen in a
separate service process) and the preemption check; against (b) the bare forward, backward,
clip and optimizer step on one pre-fetched batch (`bench_training.bare_step`). The difference
is the trainer's overhead; the target is under 5% of the step. On a shared machine that difference
is within the noise of the step time, so the parts outside the model are also timed one by one
(next micro-batch, teacher input, one log line amortised over `--log-every`, the preemption
all-reduce) and their sum is given as a share of the bare step.
`bench_training.py overhead` measures the same without the logging and the preemption check.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_training import bare_step, build_trainer, timed  # noqa: E402
from benchmarks.common import machine  # noqa: E402


def loop_step(trainer, log_every: int):
    """One iteration of the body of `Trainer.fit` without checkpoints, validation or evaluation."""
    tokens_per_image = sum(p * p for p in trainer.patch_nums)
    images_per_step = trainer.cfg.optim.global_batch_size
    last = [time.perf_counter()]

    def step():
        out = trainer.train_step()
        if trainer.step % log_every == 0:
            now = time.perf_counter()
            images_per_s = images_per_step * log_every / (now - last[0])
            last[0] = now
            trainer.logger.log(trainer.step, trainer._train_metrics(out, images_per_s, tokens_per_image, None))
        trainer.preemption.stop_code(trainer.device)
    return step


def component_times(trainer, log_every: int, repeats: int = 40) -> dict[str, float]:
    """Seconds per optimizer step of each part of the loop outside the model and optimizer."""
    batch = trainer._next_batch()
    with torch.no_grad():
        teacher = timed(lambda: trainer.quantizer.tokens_to_teacher_input(batch.tokens_per_scale), repeats)
    data = timed(trainer._next_batch, repeats)
    out = trainer.train_step()
    tokens_per_image = sum(p * p for p in trainer.patch_nums)
    with redirect_stdout(io.StringIO()):  # the console line is timed, not shown
        log = timed(lambda: trainer.logger.log(trainer.step, trainer._train_metrics(out, 1.0, tokens_per_image, None)),
                    repeats)
    stop = timed(lambda: trainer.preemption.stop_code(trainer.device), repeats)
    accumulation = trainer.accumulation
    return {"next micro-batch": data * accumulation, "teacher input": teacher * accumulation,
            "log line / log_every": log / log_every, "preemption all-reduce": stop}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/demo.yaml")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--records", type=int, default=4096, help="synthetic records in the token shards")
    parser.add_argument("--log-every", type=int, default=None, help="default: the recipe's logging.log_every")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, section.key=value")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "shards").mkdir()  # bench_training.synthetic_shards writes into an existing folder
        trainer = build_trainer(args.overrides, args.recipe, Path(tmp), records=args.records)
        log_every = args.log_every or trainer.cfg.logging.log_every
        trainer.engine.unwrapped_model.train()
        bare = bare_step(trainer, trainer._next_batch())
        full = loop_step(trainer, log_every)
        bare()
        full()  # starts the loader workers
        full_times, bare_times = [], []
        for _ in range(args.rounds):  # interleaved, so changes in machine load hit both alike
            full_times.append(timed(full, args.steps))
            bare_times.append(timed(bare, args.steps))
        parts = component_times(trainer, log_every)
        trainer.logger.close()
    full_s = sorted(full_times)[len(full_times) // 2]
    bare_s = sorted(bare_times)[len(bare_times) // 2]
    cfg = trainer.cfg
    print(f"machine: {machine()}")
    print(f"recipe {args.recipe} {' '.join(args.overrides)}: {cfg.optim.global_batch_size} images/step "
          f"({trainer.accumulation} x {cfg.optim.micro_batch_size}), engine {cfg.parallel.engine}, "
          f"world size {trainer.world_size}, data.num_workers {cfg.data.num_workers}, log every {log_every}")
    print(f"loop step {full_s * 1e3:.1f} ms (median of {args.rounds} rounds of {args.steps}), "
          f"bare forward/backward/optimizer {bare_s * 1e3:.1f} ms")
    print(f"outside the model and optimizer (data, teacher input, statistics, logging): "
          f"{max(0.0, 1 - bare_s / full_s):.1%} (difference of medians)")
    print("timed one by one, per optimizer step: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in parts.items()))
    print(f"sum {sum(parts.values()) * 1e3:.2f} ms = {sum(parts.values()) / bare_s:.1%} of the bare step")


if __name__ == "__main__":
    main()
