"""Generating evaluation samples: which rank makes which sample, and driving a (sharded) VAR.

The global sample list is class-balanced: sample i has class i % num_classes. A model sharded with
FSDP2 all-gathers each block's weights inside its forward, a collective, so every rank must call it
the same number of times with the same scale sequence: `RankPlan` gives every rank the same number
of fixed-size batches, padding the last ones; padded rows are generated and thrown away.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from var_train.models import VAR, sample_tokens


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
    """The VAR inside whatever wraps it (DDP, DeepSpeed; FSDP2 modifies the VAR in place)."""
    for module in model.modules():
        if isinstance(module, VAR):
            return module
    raise TypeError(f"no VAR inside {type(model).__name__}")


@contextlib.contextmanager
def full_parameters(var: VAR):
    """Make the VAR callable outside its own forward: sampling calls its embeddings and head
    directly, so FSDP2's root group (everything but the blocks, which all-gather themselves in
    their forward) is unsharded here, and ZeRO-3 partitions are gathered."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(var, FSDPModule):
        var.unshard()
        try:
            yield
        finally:
            var.reshard()
    elif any(hasattr(p, "ds_id") for p in var.parameters()):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(var.parameters()), modifier_rank=None):
            yield
    else:
        yield


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def sampling_autocast(var: VAR, device: torch.device):
    """bf16 on CUDA (as `var-train sample`), and wherever the weights are already bf16."""
    low_precision = any(p.dtype == torch.bfloat16 for p in var.parameters())
    if device.type == "cuda" or low_precision:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def generate_batch(var: VAR, quantizer, vae, labels: torch.Tensor, *, cfg: float, top_k: int, top_p: float,
                   generator: torch.Generator, decode_rows: int | None = None) -> torch.Tensor:
    """labels (B,) -> uint8 images (decode_rows or B, 3, H, W) on the labels' device. Only the
    first `decode_rows` token rows are decoded (the rest are padding for the collective)."""
    device = labels.device
    with sampling_autocast(var, device):
        tokens = sample_tokens(var, quantizer, labels, cfg=cfg, top_k=top_k, top_p=top_p, generator=generator)
    rows = len(labels) if decode_rows is None else decode_rows
    if rows == 0:
        return torch.empty(0, 3, vae.resolution, vae.resolution, dtype=torch.uint8, device=device)
    return vae.tokens_to_uint8_image([t[:rows] for t in tokens])  # decoded in fp32, as `var-train sample`


def batch_generator(device: torch.device, seed: int, batch_key: int) -> torch.Generator:
    """One generator per (seed, batch): the same batch gets the same noise in every evaluation."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + batch_key)
