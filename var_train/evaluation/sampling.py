"""Generating evaluation samples: which rank makes which sample, and driving a (sharded) VAR.

The images themselves come from `var_train.models.generate_batch`, the project's one generation
path: sample i's random draws follow from (seed, i), so the split below changes nothing in them.

The global sample list is class-balanced: sample i has class i % num_classes. The model comes from
`engine.full_model()` (the engine makes it callable piece by piece); a sharded engine may still
all-gather a block's weights inside its forward, a collective, so every rank must call it the same
number of times with the same scale sequence: `RankPlan` gives every rank the same number of
fixed-size batches, padding the last ones; padded rows are generated and thrown away.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from var_train.models import VAR, SamplingSettings


def sampling_settings(eval_cfg) -> SamplingSettings:
    """The `eval` config section's sampling keys (cfg, top_k, top_p, seed) as SamplingSettings."""
    return SamplingSettings(cfg=float(eval_cfg.cfg), top_k=int(eval_cfg.top_k), top_p=float(eval_cfg.top_p),
                            seed=int(eval_cfg.seed))


def class_balanced_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    return torch.arange(num_samples) % num_classes


@dataclass(frozen=True)
class RankPlan:
    """This rank's contiguous slice [start, stop) of the global sample list, cut into
    `num_batches` batches of `batch_size` (the same count on every rank)."""

    start: int
    stop: int
    batch_size: int
    num_batches: int

    @classmethod
    def make(cls, num_samples: int, batch_size: int, rank: int, world_size: int) -> "RankPlan":
        if num_samples < 1 or batch_size < 1:
            raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}")
        per_rank = math.ceil(num_samples / world_size)
        start = min(num_samples, rank * per_rank)
        return cls(start, min(num_samples, start + per_rank), batch_size, math.ceil(per_rank / batch_size))

    def batch_indices(self, batch: int) -> torch.Tensor:
        """Global sample indices of batch `batch` (fewer than batch_size, or none, at the end)."""
        first = self.start + batch * self.batch_size
        return torch.arange(first, min(self.stop, first + self.batch_size))


def find_var(model: nn.Module) -> VAR:
    """The VAR inside `model` (itself, usually: the model yielded by `engine.full_model()`)."""
    for module in model.modules():
        if isinstance(module, VAR):
            return module
    raise TypeError(f"no VAR inside {type(model).__name__}")


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
