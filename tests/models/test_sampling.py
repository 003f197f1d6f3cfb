import pytest
import torch

from tests.models.tiny import tiny_models
from var_train.models import filter_top_k_top_p, sample_tokens


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
