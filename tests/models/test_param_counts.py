"""The released architectures, built on the meta device: exact parameter counts and FLOPs."""

import pytest
import torch

from var_train.models import VAR, VQVAE


@pytest.mark.parametrize("depth, expected_params, expected_gflops", [
    (16, 310_283_520, 839), (20, 600_917_136, 1_627), (24, 1_033_399_360, 2_800), (30, 2_010_020_356, 5_451),
])
def test_var_parameter_count_and_flops(depth, expected_params, expected_gflops):
    with torch.device("meta"):
        model = VAR(depth=depth)
    assert model.embed_dim == 64 * depth and model.num_heads == depth
    assert sum(p.numel() for p in model.parameters()) == expected_params
    assert round(model.train_flops_per_image() / 1e9) == expected_gflops
    assert model.train_flops_per_image(include_attention_scores=True) > model.train_flops_per_image()


def test_vqvae_parameter_count_and_light_quantizer():
    with torch.device("meta"):
        vae = VQVAE()
    assert sum(p.numel() for p in vae.parameters()) == 108_948_355
    # What training needs to build teacher input: codebook + 4 phi convs.
    assert sum(p.numel() for p in vae.quantize.parameters()) == 4096 * 32 + 4 * (32 * 32 * 9 + 32)
