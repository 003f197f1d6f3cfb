"""Next-scale prediction loss: cross-entropy over all L tokens, each weighted 1/L, with per-scale
statistics for logging (the paper reports the mean and the last scale, the "tail")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TokenLoss:
    loss: torch.Tensor  # scalar, differentiable
    loss_per_scale: torch.Tensor  # (K,) detached
    accuracy_per_scale: torch.Tensor  # (K,) detached
    accuracy: torch.Tensor  # scalar, detached: over all tokens


def token_loss(logits: torch.Tensor, targets: torch.Tensor, patch_nums, num_active_scales: int | None = None) -> TokenLoss:
    """logits (B, L, V) float32, targets (B, L) int64. With `num_active_scales` (progressive
    training) only the first scales count towards the loss."""
    batch, length, vocab = logits.shape
    per_token = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), reduction="none").view(batch, length)
    sizes = [p * p for p in patch_nums]
    if num_active_scales is None or num_active_scales >= len(sizes):
        loss = per_token.mean()
    else:
        active = sum(sizes[:num_active_scales])
        loss = per_token[:, :active].mean()
    with torch.no_grad():
        correct = (logits.argmax(dim=-1) == targets).float()
        per_scale_loss = torch.stack([chunk.mean() for chunk in per_token.detach().split(sizes, dim=1)])
        per_scale_acc = torch.stack([chunk.mean() for chunk in correct.split(sizes, dim=1)])
    return TokenLoss(loss, per_scale_loss, per_scale_acc, correct.mean())
