"""Block-causal attention through torch's fused kernels, and the static KV cache used in sampling.

Training attends with one call over all L tokens: a query of scale k sees every key of scales
<= k. Two backends compute exactly that:
- "sdpa": `scaled_dot_product_attention` with a boolean (L, L) mask. Works everywhere, with
  backward on CPU; the reference path that everything else is checked against.
- "flex": FlexAttention with a block mask built from each token's scale, which skips the
  fully-masked tiles (about half of the L x L scores). GPU only for training: FlexAttention has no
  backward on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ATTENTION_BACKENDS = ("sdpa", "flex")


def block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask, scale: float) -> torch.Tensor:
    """q (B, H, Lq, D), k/v (B, H, Lk, D) -> (B, H, Lq, D). `attn_mask`: None (attend to all),
    a bool tensor broadcastable to (B, H, Lq, Lk) (True = attend), or a FlexAttention BlockMask."""
    if attn_mask is None or isinstance(attn_mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    return _flex_attention()(q, k, v, block_mask=attn_mask, scale=scale)


_compiled_flex = None


def _flex_attention():
    """FlexAttention is only fast compiled; compile it once per process, lazily."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention
        _compiled_flex = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention
    return _compiled_flex


def flex_block_mask(token_levels: torch.Tensor):
    """Block mask for FlexAttention from each token's scale index (L,)."""
    from torch.nn.attention.flex_attention import create_block_mask

    levels = token_levels.contiguous()
    length = levels.numel()

    def visible(batch, head, query, key):
        return levels[key] <= levels[query]

    return create_block_mask(visible, B=None, H=None, Q_LEN=length, KV_LEN=length, device=levels.device)


class KVCache:
    """Preallocated keys/values for one attention layer: appending a scale writes in place,
    so sampling does no reallocation or concatenation as the sequence grows. The buffers are
    allocated at the first append, in the dtype the layer produces (bf16 under autocast)."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None:
            batch, heads, _, head_dim = k.shape
            self.keys = k.new_empty(batch, heads, self.max_length, head_dim)
            self.values = v.new_empty(batch, heads, self.max_length, head_dim)
        end = self.length + k.shape[2]
        self.keys[:, :, self.length:end] = k
        self.values[:, :, self.length:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]
