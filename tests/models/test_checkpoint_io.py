import pytest
import torch

from tests.models.tiny import VAE_KW, tiny_models
from var_train.models import VAR, VQVAE
from var_train.models.checkpoint_io import (StateDictMismatchError, load_quantizer, load_state_dict_strict,
                                            load_vae, load_var, save_model, save_reference_layout)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_safetensors_round_trip_restores_architecture_and_weights(tmp_path):
    vae, var = tiny_models()
    loaded_var = load_var(save_model(var, tmp_path / "var.safetensors"))
    loaded_vae = load_vae(save_model(vae, tmp_path / "vae.safetensors"))
    assert loaded_var.config == var.config and loaded_vae.config == vae.config
    assert_same_weights(var, loaded_var)
    assert_same_weights(vae, loaded_vae)


def test_reference_layout_infers_architecture(tmp_path):
    vae, var = tiny_models(shared_aln=True)
    loaded = load_var(save_reference_layout(var, tmp_path / "var.pth"))
    assert (loaded.depth, loaded.embed_dim, loaded.num_heads, loaded.patch_nums) == (2, 64, 2, (1, 2, 3, 4))
    assert_same_weights(var, loaded)
    path = save_reference_layout(vae, tmp_path / "vae.pth")
    with pytest.raises(ValueError, match="records no schedule: give its patch_nums"):
        load_vae(path)  # 4 scales cannot be guessed from the weights
    assert_same_weights(vae, load_vae(path, patch_nums=VAE_KW["patch_nums"]))


def test_quantizer_loads_alone_from_a_full_vae(tmp_path):
    vae, _ = tiny_models()
    quantizer = load_quantizer(save_model(vae, tmp_path / "vae.safetensors"))
    assert_same_weights(vae.quantize, quantizer)
    tokens = [torch.randint(0, 64, (2, p * p)) for p in (1, 2, 3, 4)]
    assert torch.equal(quantizer.tokens_to_teacher_input(tokens), vae.quantize.tokens_to_teacher_input(tokens))


def test_mismatch_lists_every_difference():
    _, var = tiny_models()
    state = var.state_dict()
    state.pop("head.bias")
    state["unexpected.weight"] = torch.zeros(1)
    state["word_embed.weight"] = torch.zeros(3, 3)
    fresh = VAR(**var.config)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(StateDictMismatchError) as info:
        load_state_dict_strict(fresh, state, "bad.pth")
    message = str(info.value)
    assert "head.bias" in message and "unexpected.weight" in message and "word_embed.weight" in message
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items()), "partial load happened"


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_var(tmp_path / "nope.pth")


def test_small_custom_tokenizer_layout_round_trips(tmp_path):
    vae = VQVAE(vocab_size=32, z_channels=8, ch=32, patch_nums=(1, 2, 4), ch_mult=(1, 2), encoder_blocks=1, decoder_blocks=1)
    assert vae.downsample == 2 and vae.resolution == 8
    assert [t.shape[1] for t in vae.image_to_tokens(torch.zeros(1, 3, 8, 8))] == [1, 4, 16]
    for path in (save_model(vae, tmp_path / "vae.safetensors"), save_reference_layout(vae, tmp_path / "vae.pth")):
        loaded = load_vae(path, patch_nums=(1, 2, 4))
        assert loaded.config == vae.config
        assert_same_weights(vae, loaded)
