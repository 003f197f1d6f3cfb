"""Pieces shared by the torchrun worker scripts of tests/distributed (a tiny VAR, synthetic
batches, stand-in configs with the recipe's field names, a single-process reference step)."""

from __future__ import annotations

import sys
from pathlib import Path
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from var_train.config import CheckpointConfig, OptimConfig, ParallelConfig  # noqa: E402
from var_train.models import VAR  # noqa: E402

PATCH_NUMS = (1, 2, 3, 4)
VAR_KW = dict(vocab_size=64, z_channels=8, num_classes=10, depth=2, embed_dim=64, num_heads=2,
              patch_nums=PATCH_NUMS, label_dropout=0.0, drop_path_rate=0.0)
MICRO_BATCH = 2


def tiny_var(seed: int = 0) -> VAR:
    torch.manual_seed(seed)
    model = VAR(**VAR_KW)
    model.init_weights(alng=0.1)
    return model


def parallel_cfg(**overrides) -> ParallelConfig:
    return ParallelConfig(**{"engine": "fsdp2", "precision": "fp32", **overrides})


def optim_cfg(world_size: int, accumulation: int = 1, **overrides) -> OptimConfig:
    cfg = dict(global_batch_size=MICRO_BATCH * world_size * accumulation, micro_batch_size=MICRO_BATCH,
               base_lr=3e-3, weight_decay=0.05, betas=[0.9, 0.95], eps=1e-8, clip_grad_norm=2.0)
    return OptimConfig(**{**cfg, **overrides})


def checkpoint_cfg(**overrides) -> CheckpointConfig:
    return CheckpointConfig(**{"every_steps": 1, "keep_last": 2, "async_save": False, "resume": "auto", **overrides})


def global_batch(step: int, size: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same (labels, teacher_input, targets) on every rank for a given step."""
    model_tokens = sum(p * p for p in PATCH_NUMS)
    gen = torch.Generator().manual_seed(seed + step)
    labels = torch.randint(0, VAR_KW["num_classes"], (size,), generator=gen)
    teacher_input = torch.randn(size, model_tokens - 1, VAR_KW["z_channels"], generator=gen)
    targets = torch.randint(0, VAR_KW["vocab_size"], (size, model_tokens), generator=gen)
    return labels, teacher_input, targets


def micro_batches(step: int, rank: int, world_size: int, accumulation: int, fixed: bool = False):
    """This rank's micro-batches of a step: the global batch split by rank, then by micro-step."""
    labels, teacher_input, targets = global_batch(0 if fixed else step, MICRO_BATCH * world_size * accumulation)
    per_rank = MICRO_BATCH * accumulation
    sl = slice(rank * per_rank, (rank + 1) * per_rank)
    labels, teacher_input, targets = labels[sl], teacher_input[sl], targets[sl]
    return [(labels[i:i + MICRO_BATCH], teacher_input[i:i + MICRO_BATCH], targets[i:i + MICRO_BATCH])
            for i in range(0, per_rank, MICRO_BATCH)]


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def train_step(engine, step: int, rank: int, world_size: int, accumulation: int, lr: float = 3e-3,
               fixed: bool = False) -> float:
    """One optimizer step through the Engine protocol; returns the mean loss over ranks."""
    batches = micro_batches(step, rank, world_size, accumulation, fixed)
    total = 0.0
    for index, (labels, teacher_input, targets) in enumerate(batches):
        with engine.micro_batch(sync=index == accumulation - 1):
            with engine.autocast():
                logits = engine.model(labels.to(engine.device), teacher_input.to(engine.device))
            loss = loss_fn(logits.float(), targets.to(engine.device)) / accumulation
            engine.backward(loss)
        total += loss.item()
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    engine.clip_grad_norm(2.0)
    engine.optimizer_step()
    engine.zero_grad()
    mean = torch.tensor([total])
    torch.distributed.all_reduce(mean)
    return mean.item() / world_size


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), f"different keys: {sorted(set(a) ^ set(b))}"
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def log(rank: int, message: str) -> None:
    if rank == 0:
        print(message, flush=True)
