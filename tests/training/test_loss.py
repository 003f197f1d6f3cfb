"""The next-scale loss: every token weighted 1/L, per-scale statistics, progressive prefix."""

import math

import pytest
import torch
import torch.nn.functional as F

from var_train.loss import token_loss

PATCH_NUMS = (1, 2, 3)  # scales of 1, 4 and 9 tokens: L = 14


def test_every_token_counts_once_and_scales_are_reported_separately():
    torch.manual_seed(0)
    logits = torch.randn(2, 14, 5, requires_grad=True)
    targets = torch.randint(0, 5, (2, 14))
    targets[:, 5:] = logits.detach()[:, 5:].argmax(-1)  # the last scale is predicted perfectly
    result = token_loss(logits, targets, PATCH_NUMS)

    per_token = F.cross_entropy(logits.detach().transpose(1, 2), targets, reduction="none")
    assert result.loss.item() == pytest.approx(per_token.mean().item(), rel=1e-6)
    for k, (start, end) in enumerate([(0, 1), (1, 5), (5, 14)]):
        assert result.loss_per_scale[k].item() == pytest.approx(per_token[:, start:end].mean().item(), rel=1e-6)
    assert result.accuracy_per_scale[2].item() == 1.0
    assert result.accuracy.item() == pytest.approx((logits.argmax(-1) == targets).float().mean().item())
    # The mean over tokens, not over scales: the 9-token scale weighs 9/14.
    assert result.loss.item() != pytest.approx(result.loss_per_scale.mean().item(), rel=1e-3)

    result.loss.backward()
    assert logits.grad.abs().sum(-1).gt(0).all()  # every position gets gradient


def test_progressive_training_counts_only_the_first_scales():
    logits = torch.zeros(1, 14, 4, requires_grad=True)
    targets = torch.zeros(1, 14, dtype=torch.long)
    result = token_loss(logits, targets, PATCH_NUMS, num_active_scales=2)
    assert result.loss.item() == pytest.approx(math.log(4))
    result.loss.backward()
    assert logits.grad[0, :5].abs().sum() > 0 and logits.grad[0, 5:].abs().sum() == 0
    assert result.loss_per_scale.shape == (3,)  # statistics still cover every scale
