"""Our models against the public reference, on every fixture in $VAR_REFERENCE_FIXTURES.

Each fixture holds randomly initialised reference weights, inputs and the reference's outputs;
the tolerances are those the reference meets when re-run: token ids identical, floats within
1e-4 in float32 on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import reference_fixture_dir, reference_fixture_paths
from var_train.models import VAR, VQVAE, sample_tokens
from var_train.models.checkpoint_io import load_state_dict_strict

TOLERANCE = 1e-4
FIXTURES = reference_fixture_paths()


def test_fixtures_are_present():
    assert FIXTURES, f"no *.pt reference fixtures in {reference_fixture_dir()} (set VAR_REFERENCE_FIXTURES)"


@pytest.fixture(scope="module", params=FIXTURES, ids=[p.stem for p in FIXTURES])
def reference(request):
    fixture = torch.load(request.param, map_location="cpu", weights_only=True)
    assert fixture["format_version"] == 1
    config = fixture["config"]
    vae = VQVAE(vocab_size=config["vocab_size"], z_channels=config["z_channels"], ch=config["ch"],
                share_quant_resi=config["share_quant_resi"], patch_nums=config["patch_nums"])
    var = VAR(vocab_size=config["vocab_size"], z_channels=config["z_channels"],
              num_classes=config["num_classes"], depth=config["depth"], embed_dim=config["embed_dim"],
              num_heads=config["num_heads"], shared_aln=config["shared_aln"],
              attn_l2_norm=config["attn_l2_norm"], patch_nums=config["patch_nums"])
    load_state_dict_strict(vae, fixture["vae_state_dict"], str(request.param))
    load_state_dict_strict(var, fixture["var_state_dict"], str(request.param))
    return fixture, vae.eval(), var.eval()


def assert_tokens_equal(ours, theirs, what):
    assert len(ours) == len(theirs), f"{what}: {len(ours)} scales vs {len(theirs)}"
    for k, (a, b) in enumerate(zip(ours, theirs)):
        mismatches = (a != b).sum().item()
        assert a.shape == b.shape and mismatches == 0, f"{what}: scale {k} differs in {mismatches} ids"


def assert_close(ours, theirs, what):
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(theirs.shape)}"
    error = (ours.float() - theirs.float()).abs().max().item()
    assert error <= TOLERANCE, f"{what}: max abs error {error:.3g} > {TOLERANCE}"


def test_tokens(reference):
    fixture, vae, _ = reference
    assert_tokens_equal(vae.image_to_tokens(fixture["images"]), fixture["tokens"], "image -> tokens")


def test_teacher_input(reference):
    fixture, vae, _ = reference
    assert_close(vae.quantize.tokens_to_teacher_input(fixture["tokens"]), fixture["teacher_input"], "teacher input")


def test_logits(reference):
    fixture, _, var = reference
    with torch.no_grad():
        logits = var(fixture["labels"], fixture["teacher_input"])
    assert logits.dtype == torch.float32
    assert_close(logits, fixture["logits"], "logits")


def test_reconstruction(reference):
    fixture, vae, _ = reference
    assert_close(vae.tokens_to_image(fixture["tokens"]), fixture["reconstruction"], "reconstruction")


def test_greedy_guided_sample(reference):
    fixture, vae, var = reference
    expected = fixture["greedy_sample"]
    tokens = sample_tokens(var, vae.quantize, expected["labels"], cfg=float(expected["cfg"]),
                           top_k=int(expected["top_k"]))
    assert_tokens_equal(tokens, expected["tokens"], "greedy guided sample")
    images = vae.tokens_to_image(tokens).add(1).mul(0.5)
    assert_close(images, expected["images"], "sampled images")
