"""The VAR transformer's parts: L2-norm attention, FFN, the AdaLN block and the AdaLN head norm.

Shapes: B batch, L tokens, C width, H heads, D = C / H head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import KVCache, block_causal_attention


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescaling the survivors."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.4f}"


class SelfAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, attn_l2_norm: bool = True):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            # Cosine attention: q, k unit-normalised, q scaled per head by a learned temperature.
            self.softmax_scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.softmax_scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))  # keys carry no bias
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.kv_cache: KVCache | None = None  # set only while sampling

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, width = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias.to(self.q_bias.dtype), self.v_bias))  # bf16 under FSDP2
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, D)
        if self.attn_l2_norm:
            temperature = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(temperature)
            k = F.normalize(k, dim=-1)
        if self.kv_cache is not None:
            k, v = self.kv_cache.append(k, v)
        out = block_causal_attention(q, k, v, attn_mask, self.softmax_scale)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class FFN(nn.Module):
    def __init__(self, embed_dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNSelfAttn(nn.Module):
    """x += gamma1 * attn(LN(x)(1+scale1)+shift1); x += gamma2 * ffn(LN(x)(1+scale2)+shift2).

    The six modulation vectors come from the class condition, through the block's own `ada_lin`
    or, with `shared_aln`, from one shared projection plus the block's learned `ada_gss`.
    """

    def __init__(self, embed_dim: int, num_heads: int, mlp_ratio: float, drop_path: float,
                 attn_l2_norm: bool, shared_aln: bool, norm_eps: float = 1e-6):
        super().__init__()
        self.embed_dim = embed_dim
        self.attn = SelfAttention(embed_dim, num_heads, attn_l2_norm)
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, 6 * embed_dim))

    def forward(self, x: torch.Tensor, condition: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, L, C); condition (B, C), or (B, 1, 6, C) from the shared AdaLN."""
        if self.shared_aln:
            modulation = self.ada_gss + condition
        else:
            modulation = self.ada_lin(condition).view(-1, 1, 6, self.embed_dim)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = modulation.unbind(2)  # each (B, 1, C)
        h = self.ln_wo_grad(x).mul(scale1 + 1).add_(shift1)
        x = x + self.drop_path(self.attn(h, attn_mask).mul_(gamma1))
        h = self.ln_wo_grad(x).mul(scale2 + 1).add_(shift2)
        return x + self.drop_path(self.ffn(h).mul(gamma2))


class AdaLNBeforeHead(nn.Module):
    def __init__(self, embed_dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.embed_dim = embed_dim
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, 2 * embed_dim))

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(condition).view(-1, 1, 2, self.embed_dim).unbind(2)
        return self.ln_wo_grad(x).mul(scale + 1).add_(shift)
