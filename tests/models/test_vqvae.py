import pytest
import torch

from tests.models.tiny import tiny_models


def test_coarse_previews_refine_towards_the_full_decode():
    vae, _ = tiny_models()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    tokens = vae.image_to_tokens(images)
    full = vae.tokens_to_image(tokens)
    assert torch.equal(vae.tokens_to_image(tokens, num_scales=len(tokens)), full)
    previews = [vae.tokens_to_image(tokens[:k]) for k in range(1, len(tokens))]
    assert all(p.shape == full.shape for p in previews)
    assert not torch.allclose(previews[0], full)


def test_features_of_all_scales_reproduce_the_quantizer_forward():
    vae, _ = tiny_models()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    out = vae.quantize(vae.encode_features(images))
    assert all(torch.equal(a, b) for a, b in zip(out.tokens_per_scale, vae.image_to_tokens(images)))
    assert torch.allclose(out.features, vae.quantize.tokens_to_features(out.tokens_per_scale), atol=1e-5)


def test_training_forward_passes_gradients_straight_through():
    vae, _ = tiny_models()
    vae.train()
    out = vae(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert out.reconstruction.shape == (2, 3, 64, 64)
    assert out.vq_loss.item() > 0 and len(out.codebook_usage_per_scale) == 4
    (out.reconstruction.square().mean() + out.vq_loss).backward()
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0, "no straight-through gradient to the encoder"
    assert vae.quantize.embedding.weight.grad.abs().sum() > 0, "codebook gets no gradient"
    assert vae.quantize.quant_resi.qresi_ls[0].weight.grad is not None
    assert vae.quantize.ema_vocab_hit_SV.sum() > 0


def test_wrong_image_size_is_rejected():
    vae, _ = tiny_models()
    with pytest.raises(ValueError, match="64x64"):
        vae.image_to_tokens(torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("num_scales, expected", [
    (10, [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]),  # 2/9 is a near-tie that float64 resolves towards phi1
    (7, [0, 0, 1, 2, 2, 3, 3]),
])
def test_phi_assignment_per_scale(num_scales, expected):
    from var_train.models.quantizer import PartiallySharedPhi
    phis = PartiallySharedPhi(channels=4, count=4)
    chosen = [list(phis.qresi_ls).index(phis.for_scale(k, num_scales)) for k in range(num_scales)]
    assert chosen == expected
