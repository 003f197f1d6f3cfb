"""Learning-rate and weight-decay schedules of the paper, as pure functions of the step.

LR: linear warmup from `warmup_start_ratio` x peak to the peak, then held at the peak for
`hold_fraction` of the remaining steps, then a linear decay to `wpe` x peak at the last step.
WD: constant, or (d30) a cosine from `weight_decay` at step 0 to `weight_decay_end` at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from var_train.errors import ConfigError


@dataclass(frozen=True)
class Schedule:
    peak_lr: float
    total_steps: int
    warmup_steps: int
    warmup_start_ratio: float = 0.005
    hold_fraction: float = 0.05
    wpe: float = 0.1
    weight_decay: float = 0.05
    weight_decay_end: float | None = None

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            ratio = self.warmup_start_ratio + (1 - self.warmup_start_ratio) * step / self.warmup_steps
        else:
            span = max(1, self.total_steps - 1 - self.warmup_steps)
            passed = min(1.0, (step - self.warmup_steps) / span)
            if passed < self.hold_fraction:
                ratio = 1.0
            else:
                ratio = self.wpe + (1 - self.wpe) * (1 - passed) / (1 - self.hold_fraction)
        return self.peak_lr * ratio

    def weight_decay_at(self, step: int) -> float:
        if self.weight_decay_end is None:
            return self.weight_decay
        passed = min(1.0, step / max(1, self.total_steps - 1))
        start, end = self.weight_decay, self.weight_decay_end
        return end + (start - end) * (0.5 + 0.5 * math.cos(math.pi * passed))


def steps_per_epoch(micro_batches_per_rank: int, accumulation: int) -> float:
    """Optimizer steps in one pass over the data: the micro-batches each rank reads in an epoch over
    the micro-batches one step accumulates. Not rounded down: steps run on across epoch boundaries
    (7 micro-batches at 2 per step make 3.5 steps an epoch), so `optim.epochs` counts passes over
    the data whatever the accumulation."""
    if micro_batches_per_rank < accumulation:
        raise ConfigError(f"one epoch has {micro_batches_per_rank} micro-batches per rank, fewer than the "
                          f"{accumulation} accumulated into one optimizer step: lower optim.global_batch_size "
                          f"(or use more data)")
    return micro_batches_per_rank / accumulation


def build_schedule(optim_cfg, steps_per_epoch: float) -> Schedule:
    """From the `optim` recipe section and the optimizer steps in one epoch."""
    total = max(1, round(optim_cfg.epochs * steps_per_epoch))
    warmup_epochs = optim_cfg.epochs / 50 if optim_cfg.warmup_epochs is None else optim_cfg.warmup_epochs
    return Schedule(
        peak_lr=optim_cfg.base_lr * optim_cfg.global_batch_size / 256, total_steps=total,
        warmup_steps=min(total - 1, round(warmup_epochs * steps_per_epoch)),
        warmup_start_ratio=optim_cfg.warmup_start_ratio, hold_fraction=optim_cfg.hold_fraction,
        wpe=optim_cfg.wpe, weight_decay=optim_cfg.weight_decay, weight_decay_end=optim_cfg.weight_decay_end,
    )
