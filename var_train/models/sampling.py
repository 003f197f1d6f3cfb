"""KV-cached next-scale sampling with classifier-free guidance ramped over the scales.

Each of the K steps feeds only the new scale's tokens (the cache holds every earlier scale) for
2B rows: B conditional, B with the null class. At scale k the guided logits are
(1 + t) * cond - t * uncond with t = cfg * k / (K - 1), so guidance grows from 0 on the
coarsest map to `cfg` on the finest; then top-k and top-p filtering and a multinomial draw.
"""

from __future__ import annotations

import torch

from .quantizer import MultiScaleQuantizer
from .var import VAR


def filter_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Mask (in place) logits (..., V) outside the top-k and outside the smallest set whose
    probability reaches top_p. 0 disables either filter."""
    if top_k > 0:
        kth_best = logits.topk(min(top_k, logits.shape[-1]), dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth_best, -torch.inf)
    if top_p > 0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum_(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1:] = False  # always keep the most likely token
        logits.masked_fill_(remove_sorted.scatter(-1, order, remove_sorted), -torch.inf)
    return logits


@torch.no_grad()
def sample_tokens(var: VAR, quantizer: MultiScaleQuantizer, labels: torch.Tensor, cfg: float = 1.5,
                  top_k: int = 0, top_p: float = 0.0, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """labels (B,) int64 (the null class `num_classes` gives unconditional samples) ->
    K x (B, pn*pn) token ids. Decode with `vae.tokens_to_image`."""
    batch = labels.shape[0]
    patch_nums, num_scales = var.patch_nums, len(var.patch_nums)
    null = torch.full_like(labels, var.num_classes)
    condition = var.class_emb(torch.cat((labels, null)))  # (2B, C)
    block_condition = var.shared_ada_lin(condition)
    level_and_position = var.lvl_embed(var.lvl_1L) + var.pos_1LC  # (1, L, C)
    first = var.first_scale_tokens
    x = condition.unsqueeze(1) + var.pos_start + level_and_position[:, :first]
    final = patch_nums[-1]
    f_hat = condition.new_zeros(batch, quantizer.z_channels, final, final, dtype=torch.float32)
    tokens_per_scale = []
    start = 0
    var.enable_kv_cache()
    try:
        for k, pn in enumerate(patch_nums):
            start += pn * pn
            for block in var.blocks:
                x = block(x, block_condition, None)
            logits = var.logits(x, condition)  # (2B, pn*pn, V)
            t = cfg * k / (num_scales - 1) if num_scales > 1 else cfg
            guided = (1 + t) * logits[:batch] - t * logits[batch:]
            probs = filter_top_k_top_p(guided, top_k, top_p).softmax(dim=-1)
            ids = torch.multinomial(probs.view(-1, probs.shape[-1]), 1, generator=generator).view(batch, pn * pn)
            tokens_per_scale.append(ids)
            codes = quantizer.embedding(ids).transpose(1, 2).reshape(batch, quantizer.z_channels, pn, pn)
            f_hat, next_input = quantizer.next_autoregressive_input(k, f_hat, codes)
            if next_input is not None:
                next_len = patch_nums[k + 1] ** 2
                x = var.word_embed(next_input) + level_and_position[:, start:start + next_len]
                x = x.repeat(2, 1, 1)  # conditional and unconditional rows
    finally:
        var.disable_kv_cache()
    return tokens_per_scale
