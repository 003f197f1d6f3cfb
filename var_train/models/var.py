"""VAR: a class-conditional transformer that predicts a whole token map per step, coarse to fine.

Input sequence (L = sum pn^2 tokens): the class embedding plus `pos_start` stands for the first
scale; the teacher-forcing features of scales 2..K (built from ground-truth tokens by the
quantizer) go through `word_embed`. Every token adds a learned absolute position (`pos_1LC`) and
its scale's level embedding. Attention is block-causal: bidirectional within a scale, causal
across scales. The class embedding also conditions every block through AdaLN. Parameter names
follow the released `var_d*.pth` checkpoints.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .attention import ATTENTION_BACKENDS, KVCache, flex_block_mask
from .param_groups import decay_groups
from .quantizer import DEFAULT_PATCH_NUMS
from .size_rules import size_rule
from .transformer_blocks import AdaLNBeforeHead, AdaLNSelfAttn

class SharedAdaLin(nn.Linear):
    """One AdaLN projection for all blocks (the 512px d36 model's `shared_aln`)."""

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        width = self.weight.shape[0] // 6
        return super().forward(condition).view(-1, 1, 6, width)


class VAR(nn.Module):
    # The units that engines checkpoint, compile and shard one by one (var_train.parallel).
    block_classes = (AdaLNSelfAttn,)
    # Substrings of parameter names kept out of weight decay, besides every 1-D parameter and
    # bias: learned position/level/start tables, AdaLN gammas and the attention temperature
    # (decaying a position table or a temperature towards 0 only hurts).
    no_weight_decay_names = ("pos_start", "pos_1LC", "lvl_embed", "gamma", "ada_gss", "scale_mul")

    def __init__(self, vocab_size: int = 4096, z_channels: int = 32, num_classes: int = 1000,
                 depth: int = 16, embed_dim: int | None = None, num_heads: int | None = None,
                 mlp_ratio: float = 4.0, drop_path_rate: float | None = None,
                 attn_l2_norm: bool = True, shared_aln: bool = False,
                 patch_nums: tuple[int, ...] = DEFAULT_PATCH_NUMS, label_dropout: float = 0.1,
                 norm_eps: float = 1e-6, attention_backend: str = "sdpa"):
        super().__init__()
        rule = size_rule(depth)  # the paper's per-depth defaults (models/size_rules.py)
        embed_dim = rule.embed_dim if embed_dim is None else embed_dim
        num_heads = rule.num_heads if num_heads is None else num_heads
        drop_path_rate = rule.drop_path_rate if drop_path_rate is None else drop_path_rate
        self.config = dict(vocab_size=vocab_size, z_channels=z_channels, num_classes=num_classes,
                           depth=depth, embed_dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           drop_path_rate=drop_path_rate, attn_l2_norm=attn_l2_norm,
                           shared_aln=shared_aln, patch_nums=list(patch_nums),
                           label_dropout=label_dropout, norm_eps=norm_eps)
        self.vocab_size, self.z_channels, self.num_classes = vocab_size, z_channels, num_classes
        self.depth, self.embed_dim, self.num_heads = depth, embed_dim, num_heads
        self.patch_nums = tuple(int(p) for p in patch_nums)
        self.num_tokens = sum(p * p for p in self.patch_nums)
        self.first_scale_tokens = self.patch_nums[0] ** 2
        self.label_dropout = label_dropout
        init_std = math.sqrt(1 / (3 * embed_dim))

        # Inputs. Class id `num_classes` is the null class of classifier-free guidance.
        self.word_embed = nn.Linear(z_channels, embed_dim)
        self.class_emb = nn.Embedding(num_classes + 1, embed_dim)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_scale_tokens, embed_dim))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.num_tokens, embed_dim))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), embed_dim)
        for tensor in (self.class_emb.weight, self.pos_start, self.pos_1LC, self.lvl_embed.weight):
            nn.init.trunc_normal_(tensor.data, mean=0, std=init_std)

        # Backbone: drop-path rises linearly from 0 over the blocks.
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(embed_dim, 6 * embed_dim)) if shared_aln else nn.Identity()
        drop_paths = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([
            AdaLNSelfAttn(embed_dim, num_heads, mlp_ratio, drop_paths[i], attn_l2_norm, shared_aln, norm_eps)
            for i in range(depth)
        ])

        # Each token's scale index, and the block-causal mask (kept in the released layout too).
        levels = torch.cat([torch.full((pn * pn,), k) for k, pn in enumerate(self.patch_nums)])
        self.register_buffer("lvl_1L", levels.view(1, self.num_tokens))
        attend = levels.view(-1, 1) >= levels.view(1, -1)  # (L, L): query level >= key level
        self.register_buffer("attn_bias_for_masking",
                             torch.zeros(1, 1, self.num_tokens, self.num_tokens).masked_fill_(~attend, -torch.inf))
        self.register_buffer("attend_mask", attend.view(1, 1, self.num_tokens, self.num_tokens), persistent=False)
        self._flex_mask = None
        self.attention_backend = "sdpa"
        self.set_attention_backend(attention_backend)

        self.head_nm = AdaLNBeforeHead(embed_dim, norm_eps)
        self.head = nn.Linear(embed_dim, vocab_size)

    # -- the forward pass of training -----------------------------------------------------------
    def forward(self, labels: torch.Tensor, teacher_input: torch.Tensor) -> torch.Tensor:
        """labels (B,) int64; teacher_input (B, L - pn_1^2, z) -> logits (B, L, V) float32."""
        batch = labels.shape[0]
        if self.training and self.label_dropout > 0:
            dropped = torch.rand(batch, device=labels.device) < self.label_dropout
            labels = torch.where(dropped, self.num_classes, labels)
        condition = self.class_emb(labels)  # (B, C)
        start = condition.unsqueeze(1) + self.pos_start  # (B, pn_1^2, C)
        x = torch.cat((start, self.word_embed(teacher_input.float())), dim=1)
        x = x + (self.lvl_embed(self.lvl_1L) + self.pos_1LC)  # (B, L, C)
        block_condition = self.shared_ada_lin(condition)
        mask = self.attention_mask()
        for block in self.blocks:
            x = block(x, block_condition, mask)
        return self.logits(x, condition)

    def logits(self, hidden: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.head(self.head_nm(hidden.float(), condition.float())).float()

    # -- attention backends and the KV cache of sampling ---------------------------------------
    def set_attention_backend(self, backend: str) -> None:
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
        self.attention_backend = backend
        self._flex_mask = None

    def attention_mask(self):
        if self.attention_backend == "sdpa":
            return self.attend_mask
        if self._flex_mask is None:
            self._flex_mask = flex_block_mask(self.lvl_1L[0])
        return self._flex_mask

    def enable_kv_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = KVCache(self.num_tokens)

    def disable_kv_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None

    # -- initialisation and accounting --------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, alng: float | None = None, adaln_scale: float = 0.5, head_scale: float = 0.02) -> None:
        """The reference initialisation: trunc-normal std sqrt(1/(3C)) for Linear and Embedding,
        a small head, halved AdaLN scale/shift rows, tiny AdaLN gammas, and output projections
        divided by sqrt(2 * depth)."""
        alng = size_rule(self.depth).alng if alng is None else alng
        init_std = math.sqrt(1 / (3 * self.embed_dim))
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=init_std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
        self.head.weight.mul_(head_scale)
        self.head.bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(adaln_scale)
        self.head_nm.ada_lin[-1].bias.zero_()
        width = self.embed_dim
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * self.depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * self.depth))
            if block.shared_aln:
                block.ada_gss[:, :, 2:].mul_(adaln_scale)
                block.ada_gss[:, :, :2].mul_(alng)
            else:
                block.ada_lin[-1].weight[2 * width:].mul_(adaln_scale)  # scales and shifts
                block.ada_lin[-1].weight[:2 * width].mul_(alng)  # gammas
                block.ada_lin[-1].bias.zero_()

    def train_flops_per_image(self, include_attention_scores: bool = False) -> float:
        """Forward+backward FLOPs of one image, counted as the paper does: 6 x (matmul parameters
        applied per token) x L, plus the AdaLN linears, which run once per image. With
        `include_attention_scores`, the block-causal QK^T and AV products are added (for MFU)."""
        width, depth, length = self.embed_dim, self.depth, self.num_tokens
        per_token = depth * 12 * width * width + width * self.vocab_size + self.z_channels * width
        per_image = depth * 6 * width * width + 2 * width * width
        flops = 6.0 * (per_token * length + per_image)
        if include_attention_scores:
            visible, seen = 0, 0
            for pn in self.patch_nums:
                seen += pn * pn
                visible += pn * pn * seen
            flops += 3.0 * depth * 4 * width * visible
        return flops

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """The reference's AdamW groups: "decay" (linear matrices, class embedding) with
        `weight_decay`, "no_decay" (see `no_weight_decay_names`) with 0."""
        return decay_groups(self.named_parameters(), weight_decay, self.no_weight_decay_names)

    def activation_bytes_per_image(self, compute_bytes: int, activation_checkpointing: bool) -> float:
        """Activation memory one training image keeps for its backward. Blocks follow Korthikanti
        et al. (2022): 34 x tokens x width bytes per block in 16-bit (no attention-score term:
        fused attention kernels do not keep the scores), scaled by `compute_bytes` / 2; with
        activation checkpointing only each block's input is kept, plus one block recomputed at a
        time. The fp32 logits, their softmax and gradient come on top."""
        tokens, width = self.num_tokens, self.embed_dim
        per_block = 34 * tokens * width * compute_bytes / 2
        block_input = tokens * width * compute_bytes
        blocks = self.depth * block_input + per_block if activation_checkpointing else self.depth * per_block
        logits = 3 * tokens * self.vocab_size * 4
        return float(blocks + logits)
