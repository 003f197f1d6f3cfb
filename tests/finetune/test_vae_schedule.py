"""The VQVAE serves any scale schedule: released .pth layout and our safetensors alike."""

from __future__ import annotations

import pytest
import torch

from tests.models.tiny import VAE_KW
from var_train.models import VQVAE
from var_train.models.checkpoint_io import load_quantizer, load_vae, save_model, save_reference_layout

SEVEN = (1, 2, 3, 4, 5, 6, 8)  # 128 px with the 16x tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    vae = VQVAE(**VAE_KW).eval()  # trained on (1, 2, 3, 4): 64 px
    return vae, save_model(vae, root / "vae.safetensors"), save_reference_layout(vae, root / "vae.pth")


@pytest.mark.parametrize("which", ["safetensors", "pth"])
def test_any_schedule_loads_with_the_same_weights_and_the_reference_phi_choice(saved, which):
    vae, safetensors_path, pth_path = saved
    loaded = load_vae(safetensors_path if which == "safetensors" else pth_path, patch_nums=SEVEN)
    assert loaded.patch_nums == SEVEN and loaded.resolution == 128
    old = vae.state_dict()
    for name, tensor in loaded.state_dict().items():
        if name != "quantize.ema_vocab_hit_SV":  # per-scale statistics: one row per scale, restarted
            assert torch.equal(tensor, old[name]), name
    assert loaded.quantize.ema_vocab_hit_SV.shape == (7, VAE_KW["vocab_size"])
    # REFERENCE.md: with K = 7, scales {0,1} -> phi0, {2} -> phi1, {3,4} -> phi2, {5,6} -> phi3.
    convs = loaded.quantize.quant_resi.qresi_ls
    assert [next(i for i, c in enumerate(convs) if c is loaded.quantize.phi(k)) for k in range(7)] == [0, 0, 1, 2, 2, 3, 3]
    images = torch.rand(2, 3, 128, 128) * 2 - 1
    tokens = loaded.image_to_tokens(images)
    assert [t.shape[1] for t in tokens] == [p * p for p in SEVEN]
    assert loaded.tokens_to_image(tokens).shape == (2, 3, 128, 128)
    with pytest.raises(ValueError, match="128x128"):
        loaded.image_to_tokens(torch.zeros(1, 3, 64, 64))


def test_the_quantizer_alone_follows_the_requested_schedule(saved):
    vae, path, _ = saved
    quantizer = load_quantizer(path, patch_nums=(1, 2, 4, 6))
    assert quantizer.patch_nums == (1, 2, 4, 6)
    assert torch.equal(quantizer.embedding.weight, vae.quantize.embedding.weight)
    tokens = [torch.randint(0, 64, (2, p * p)) for p in (1, 2, 4, 6)]
    assert quantizer.tokens_to_teacher_input(tokens).shape == (2, 4 + 16 + 36, 8)
    with pytest.raises(ValueError, match="strictly increasing"):
        load_quantizer(path, patch_nums=(1, 3, 2))


def test_extraction_at_a_new_resolution_with_the_released_layout(tmp_path):
    """The tiny reference-layout VAE (4 scales, 64 px) extracts 96 px images on (1, 2, 3, 4, 6)."""
    from data_prep.extract import ExtractConfig, extract_tokens
    from tests.data.extract_helpers import random_images, tiny_vae_checkpoint, write_image_folder
    from var_train.data.manifest import read_manifest

    vae_path, vae = tiny_vae_checkpoint(tmp_path)
    write_image_folder(tmp_path / "images", random_images(4, 100, 120), [0, 1, 0, 1])
    summary = extract_tokens(ExtractConfig(source=str(tmp_path / "images"), vae=str(vae_path), out=str(tmp_path / "out"),
                                           resolution=96, patch_nums=(1, 2, 3, 4, 6), num_workers=0,
                                           device="cpu", progress=False))
    assert summary.complete
    manifest = read_manifest(tmp_path / "out")
    assert manifest.num_records == 4 and manifest.patch_nums == [1, 2, 3, 4, 6]
    assert manifest.num_tokens == 1 + 4 + 9 + 16 + 36 and manifest.resolution == 96
