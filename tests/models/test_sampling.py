import pytest
import torch

from tests.models.tiny import tiny_models
from var_train.models import SamplingSettings, filter_top_k_top_p, generate_batch, sample_generator, sample_tokens


def test_top_k_keeps_exactly_the_k_best():
    logits = torch.tensor([[[0.1, 3.0, 2.0, -1.0, 2.5]]])
    kept = torch.isfinite(filter_top_k_top_p(logits.clone(), top_k=2))
    assert kept.tolist() == [[[False, True, False, False, True]]]


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = torch.isfinite(filter_top_k_top_p(probs.log().view(1, 1, 4), top_p=0.75))
    assert kept.view(-1).tolist() == [True, True, False, False]
    kept = torch.isfinite(filter_top_k_top_p(probs.log().view(1, 1, 4), top_p=0.01))
    assert kept.view(-1).tolist() == [True, False, False, False]  # the best token always stays


def test_seeded_sampling_is_reproducible_and_any_batch_size_works():
    vae, var = tiny_models()
    labels = torch.tensor([0, 3, 7])
    draw = lambda seed: sample_tokens(var, vae.quantize, labels, cfg=2.0, top_k=10, top_p=0.9,
                                      generator=torch.Generator().manual_seed(seed))
    a, b, c = draw(1), draw(1), draw(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, c))
    assert [t.shape for t in a] == [(3, 1), (3, 4), (3, 9), (3, 16)]
    one = sample_tokens(var, vae.quantize, torch.tensor([5]), top_k=1)
    assert vae.tokens_to_image(one).shape == (1, 3, 64, 64)


def test_kv_cached_greedy_sampling_matches_full_teacher_forced_forward():
    """Without guidance, greedy tokens must be the argmax of a full (uncached) forward pass over
    the sampled tokens themselves: the cache changes the cost, not the result."""
    vae, var = tiny_models()
    labels = torch.tensor([1, 4])
    tokens = sample_tokens(var, vae.quantize, labels, cfg=0.0, top_k=1)
    with torch.no_grad():
        logits = var(labels, vae.quantize.tokens_to_teacher_input(tokens))
    assert torch.equal(logits.argmax(-1), torch.cat(tokens, dim=1))
    assert all(block.attn.kv_cache is None for block in var.blocks), "cache left enabled"


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_matches_sdpa():
    _, var = tiny_models()
    labels, teacher_input = torch.tensor([2, 9]), torch.randn(2, 29, 8)
    with torch.no_grad():  # FlexAttention has no backward on CPU
        reference = var(labels, teacher_input)
        var.set_attention_backend("flex")
        flex = var(labels, teacher_input)
    assert (reference - flex).abs().max().item() < 1e-5


def test_a_sample_is_the_same_whatever_its_batch():
    """One seeding rule: sample i draws from a generator seeded by (seed, i), and decoding always
    sees the same batch shape, so batches of 1, 3 or 4 (the last ones padded, as for a sharded
    model) give exactly the images of one batch of 5."""
    vae, var = tiny_models()
    labels = torch.tensor([3, 1, 4, 1, 5])
    settings = SamplingSettings(cfg=1.5, top_k=20, top_p=0.9, seed=5, precision="fp32")
    whole = generate_batch(var, vae, labels, range(5), settings)
    assert whole.dtype == torch.uint8 and whole.shape == (5, 3, 64, 64)
    for batch_size in (1, 3, 4):
        parts = [generate_batch(var, vae, labels[i:i + batch_size], range(i, min(5, i + batch_size)), settings,
                                pad_to=batch_size) for i in range(0, 5, batch_size)]
        assert torch.equal(torch.cat(parts), whole), batch_size
    # the seed matters, and so does the index: not one stream shared by every sample
    other_seed = SamplingSettings(cfg=1.5, top_k=20, top_p=0.9, seed=6, precision="fp32")
    assert not torch.equal(generate_batch(var, vae, labels[:3], range(3), other_seed), whole[:3])
    assert not torch.equal(generate_batch(var, vae, labels[:3], range(100, 103), settings), whole[:3])


def test_per_row_generators_draw_each_row_from_its_own_stream():
    """Row b with generator g_b gives the tokens that row alone gives with a fresh copy of g_b."""
    vae, var = tiny_models()
    labels = torch.tensor([2, 7, 7])
    rows = sample_tokens(var, vae.quantize, labels, cfg=1.0, top_k=10,
                         generator=[sample_generator(0, i) for i in range(3)])
    for b in range(3):
        alone = sample_tokens(var, vae.quantize, labels[b:b + 1], cfg=1.0, top_k=10, generator=[sample_generator(0, b)])
        assert all(torch.equal(r[b:b + 1], a) for r, a in zip(rows, alone))
    seeds = {sample_generator(seed, index).initial_seed() for seed in range(3) for index in range(1000)}
    assert len(seeds) == 3000  # no two (seed, index) pairs share a stream


def test_sampling_settings_hold_the_papers_defaults():
    settings = SamplingSettings()
    assert (settings.cfg, settings.top_k, settings.top_p) == (1.5, 900, 0.96)  # VAR paper, ImageNet 256
    with pytest.raises(ValueError, match="precision"):
        SamplingSettings(precision="fp16")
