import pytest
import torch

from tests.models.tiny import tiny_models
from var_train.models import VAR


def test_label_dropout_only_in_training():
    _, var = tiny_models(label_dropout=1.0)
    labels, teacher_input = torch.tensor([1, 2]), torch.randn(2, 29, 8)
    null = torch.full_like(labels, var.num_classes)
    with torch.no_grad():
        eval_logits = var(labels, teacher_input)
        null_logits = var(null, teacher_input)
        var.train()
        var.blocks.apply(lambda m: setattr(m, "drop_prob", 0.0) if hasattr(m, "drop_prob") else None)
        train_logits = var(labels, teacher_input)
    assert not torch.allclose(eval_logits, null_logits)
    assert torch.allclose(train_logits, null_logits), "label_dropout=1 must replace every label by the null class"


def test_block_causal_mask_hides_later_scales():
    _, var = tiny_models()
    labels, teacher_input = torch.tensor([3]), torch.randn(1, 29, 8)
    changed = teacher_input.clone()
    changed[:, 13:] += 1.0  # inputs of the last scale (tokens 14..29) only
    with torch.no_grad():
        a, b = var(labels, teacher_input), var(labels, changed)
    assert torch.equal(a[:, :14], b[:, :14]), "earlier scales saw a later scale"
    assert not torch.allclose(a[:, 14:], b[:, 14:])


@pytest.mark.parametrize("shared_aln", [False, True])
def test_bf16_autocast_forward_backward_on_cpu(shared_aln):
    _, var = tiny_models(shared_aln=shared_aln)
    var.train()
    labels, teacher_input = torch.tensor([1, 2]), torch.randn(2, 29, 8)
    targets = torch.randint(0, 64, (2, 30))
    with torch.no_grad():
        reference = var.eval()(labels, teacher_input)
    var.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = var(labels, teacher_input)
    assert logits.dtype == torch.float32
    torch.nn.functional.cross_entropy(logits.view(-1, 64), targets.view(-1)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in var.parameters() if p.requires_grad)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_eval = var.eval()(labels, teacher_input)
    assert (bf16_eval - reference).abs().max().item() < 0.05


def test_reference_initialisation():
    model = VAR(vocab_size=64, z_channels=8, num_classes=10, depth=4, embed_dim=64, num_heads=2, patch_nums=(1, 2))
    model.init_weights(alng=1e-3)
    width = model.embed_dim
    ada = model.blocks[0].ada_lin[-1].weight
    std = (1 / (3 * width)) ** 0.5
    assert ada[:2 * width].std().item() == pytest.approx(std * 1e-3, rel=0.2)  # gammas
    assert ada[2 * width:].std().item() == pytest.approx(std * 0.5, rel=0.2)  # scales, shifts
    assert model.head.weight.std().item() == pytest.approx(std * 0.02, rel=0.2)
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(std / 8 ** 0.5, rel=0.2)
    assert model.blocks[-1].drop_path.drop_prob == pytest.approx(0.1 * 4 / 24)
