"""Tiny real model configurations shared by the model tests."""

import torch

from var_train.models import VAR, VQVAE

PATCH_NUMS = (1, 2, 3, 4)
VAE_KW = dict(vocab_size=64, z_channels=8, ch=32, patch_nums=PATCH_NUMS)
VAR_KW = dict(vocab_size=64, z_channels=8, num_classes=10, depth=2, embed_dim=64, num_heads=2, patch_nums=PATCH_NUMS)


def tiny_models(seed: int = 0, **var_overrides) -> tuple[VQVAE, VAR]:
    torch.manual_seed(seed)
    vae = VQVAE(**VAE_KW).eval()
    var = VAR(**{**VAR_KW, **var_overrides})
    var.init_weights(alng=0.1)  # larger than the recipes' so the blocks matter in tests
    return vae, var.eval()
