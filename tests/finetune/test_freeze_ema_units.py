"""Freezing globs and the EMA arithmetic on one process (the engines' runs: test_freeze_ema_distributed)."""

from __future__ import annotations

import pytest
import torch

from tests.models.tiny import tiny_models
from var_train.config import ConfigError
from var_train.models.freezing import freeze_parameters
from var_train.parallel.ema import ParameterEMA, consolidate_ema


def test_freeze_globs_select_parameters_and_refuse_typos():
    _, var = tiny_models()
    summary = freeze_parameters(var, ["blocks.0.*", "word_embed.*"])
    frozen = {name for name, p in var.named_parameters() if not p.requires_grad}
    assert frozen == {name for name, _ in var.named_parameters() if name.startswith(("blocks.0.", "word_embed."))}
    assert summary.frozen == sum(p.numel() for n, p in var.named_parameters() if n in frozen)
    assert summary.trainable + summary.frozen == sum(p.numel() for p in var.parameters())
    assert summary.frozen_names == [n for n, _ in var.named_parameters() if n in frozen]
    with pytest.raises(ConfigError, match="'block.*' matches no parameter"):
        freeze_parameters(tiny_models()[1], ["block.*"])
    with pytest.raises(ConfigError, match="nothing would train"):
        freeze_parameters(tiny_models()[1], ["*"])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process, no group: intended
def test_ema_equals_the_hand_computed_average_and_swaps_back_exactly(tmp_path):
    _, var = tiny_models()
    var.head.requires_grad_(False)  # frozen: no EMA kept for it
    decay = 0.9
    ema = ParameterEMA(var, decay)
    assert "head.weight" not in ema.shadow and "word_embed.weight" in ema.shadow
    expected = var.word_embed.weight.detach().clone()
    torch.manual_seed(0)
    for _ in range(5):
        with torch.no_grad():
            for p in var.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
        ema.update()
        expected = decay * expected + (1 - decay) * var.word_embed.weight.detach()
    torch.testing.assert_close(ema.shadow["word_embed.weight"], expected, rtol=0, atol=1e-6)
    current = {n: p.detach().clone() for n, p in var.named_parameters()}
    with ema.applied():
        assert torch.equal(var.word_embed.weight, ema.shadow["word_embed.weight"])
    assert all(torch.equal(p, current[n]) for n, p in var.named_parameters())

    ema.save(tmp_path / "step")  # one process, no process group
    full = consolidate_ema(tmp_path / "step", var.state_dict())
    assert torch.equal(full["word_embed.weight"], ema.shadow["word_embed.weight"])
    assert torch.equal(full["head.weight"], var.head.weight)  # frozen: its own value
    fresh = ParameterEMA(var, decay)
    assert fresh.load(tmp_path / "step") and fresh.updates == 5
    assert torch.equal(fresh.shadow["word_embed.weight"], ema.shadow["word_embed.weight"])


def test_dry_run_shows_trainable_frozen_and_the_memory_saved():
    from tests.conftest import REPO_ROOT
    from var_train.config import load_config
    from var_train.dry_run import describe

    cfg = load_config(REPO_ROOT / "recipes" / "finetune-d16.yaml",
                      ['optim.freeze=["blocks.[0-7].*","word_embed.*"]'])
    plan = describe(cfg, 8).split("# plan", 1)[1]
    # By hand, d16 (C = 1024, 16 heads): per block mat_qkv 3C^2 + q/v biases 2C, proj C^2 + C,
    # fc1 4C^2 + 4C, fc2 4C^2 + C, ada_lin 6C^2 + 6C, scale_mul 16; word_embed 32 C + C.
    width = 1024
    block = (3 * width * width + 2 * width) + (width * width + width) + (4 * width * width + 4 * width) \
        + (4 * width * width + width) + (6 * width * width + 6 * width) + 16
    frozen = 8 * block + 32 * width + width
    assert f"{310_283_520 - frozen:,} of 310,283,520 ({frozen:,} frozen" in plan
    assert "GiB per GPU of gradients and optimizer states" in plan and "EMA (optim.ema_decay): 0.9999" in plan
    assert "warm start:            from var_d16.pth, fresh: class_emb" in plan
