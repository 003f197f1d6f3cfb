"""VAR's multi-scale VQVAE: a VQGAN-style f16 encoder/decoder around the multi-scale quantizer.

Images in [-1, 1] -> encoder (16x down) -> quant_conv -> multi-scale quantizer -> token ids per
scale; token ids -> f_hat -> post_quant_conv -> decoder -> image. Module and parameter names
follow the released `vae_ch160v4096z32.pth` so it loads with strict=True.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .param_groups import decay_groups
from .quantizer import DEFAULT_PATCH_NUMS, MultiScaleQuantizer

CHANNEL_MULTIPLIERS = (1, 1, 2, 2, 4)  # the released layout: 5 levels, 4 downsamplings, 16x


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a fused 1x1 qkv conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(batch, 3, channels, height * width)
        q, k, v = qkv.transpose(2, 3).unsqueeze(2).unbind(1)  # each (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # softmax scale C^-0.5
        h = h.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj_out(h)


class Downsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as in VQGAN


class Upsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _mid_block(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, z, H/16, W/16); attention at the lowest resolution and in the middle."""

    def __init__(self, ch: int, z_channels: int, blocks_per_level: int = 2, ch_mult=CHANNEL_MULTIPLIERS):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        channels = ch
        last_level = len(ch_mult) - 1
        for level, multiplier in enumerate(ch_mult):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(blocks_per_level):
                stage.block.append(ResnetBlock(channels, ch * multiplier))
                channels = ch * multiplier
                if level == last_level:
                    stage.attn.append(AttnBlock(channels))
            if level != last_level:
                stage.downsample = Downsample2x(channels)
            self.down.append(stage)
        self.mid = _mid_block(channels)
        self.norm_out = group_norm(channels)
        self.conv_out = nn.Conv2d(channels, z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z, h, w) -> (B, 3, 16h, 16w). `up[i]` is stored coarse-last, as in the released weights."""

    def __init__(self, ch: int, z_channels: int, blocks_per_level: int = 3, ch_mult=CHANNEL_MULTIPLIERS):
        super().__init__()
        last_level = len(ch_mult) - 1
        channels = ch * ch_mult[last_level]
        self.conv_in = nn.Conv2d(z_channels, channels, 3, 1, 1)
        self.mid = _mid_block(channels)
        stages = []
        for level in reversed(range(len(ch_mult))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(blocks_per_level):
                stage.block.append(ResnetBlock(channels, ch * ch_mult[level]))
                channels = ch * ch_mult[level]
                if level == last_level:
                    stage.attn.append(AttnBlock(channels))
            if level != 0:
                stage.upsample = Upsample2x(channels)
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = group_norm(channels)
        self.conv_out = nn.Conv2d(channels, 3, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass
class VQVAEOutput:
    reconstruction: torch.Tensor  # (B, 3, H, W), not clamped (losses want the raw output)
    vq_loss: torch.Tensor
    tokens_per_scale: list[torch.Tensor]
    codebook_usage_per_scale: list[float]


class VQVAE(nn.Module):
    """The released tokenizer is the default. `ch_mult` (one entry per level; 2^(levels-1)x
    downsampling) and the blocks per level make smaller tokenizers for small images and CPUs."""

    def __init__(self, vocab_size: int = 4096, z_channels: int = 32, ch: int = 160,
                 share_quant_resi: int = 4, patch_nums: tuple[int, ...] = DEFAULT_PATCH_NUMS,
                 beta: float = 0.25, ch_mult: tuple[int, ...] = CHANNEL_MULTIPLIERS,
                 encoder_blocks: int = 2, decoder_blocks: int = 3):
        super().__init__()
        if ch % 32:
            raise ValueError(f"ch must be a multiple of 32 (GroupNorm with 32 groups), got {ch}")
        self.config = dict(vocab_size=vocab_size, z_channels=z_channels, ch=ch,
                           share_quant_resi=share_quant_resi, patch_nums=list(patch_nums), beta=beta)
        if (tuple(ch_mult), encoder_blocks, decoder_blocks) != (CHANNEL_MULTIPLIERS, 2, 3):
            self.config.update(ch_mult=list(ch_mult), encoder_blocks=encoder_blocks, decoder_blocks=decoder_blocks)
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.encoder = Encoder(ch, z_channels, encoder_blocks, tuple(ch_mult))
        self.decoder = Decoder(ch, z_channels, decoder_blocks, tuple(ch_mult))
        self.quantize = MultiScaleQuantizer(vocab_size, z_channels, share_quant_resi, patch_nums, beta)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, 3, 1, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 3, 1, 1)

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on the conv matrices only; never on the codebook, which decay would
        pull towards 0, where its codes stop winning the nearest-code search."""
        return decay_groups(self.named_parameters(), weight_decay, no_decay_names=("quantize.embedding",))

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.quantize.patch_nums

    @property
    def resolution(self) -> int:
        return self.downsample * self.patch_nums[-1]

    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(images))

    @torch.no_grad()
    def image_to_tokens(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) in [-1, 1], H = W = `resolution` -> K x (B, pn*pn) int64."""
        expected = self.resolution
        if images.shape[-2:] != (expected, expected):
            raise ValueError(f"images must be {expected}x{expected} for patch_nums {self.patch_nums}, "
                             f"got {tuple(images.shape[-2:])}")
        return self.quantize.features_to_tokens(self.encode_features(images))

    def features_to_image(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)

    @torch.no_grad()
    def tokens_to_image(self, tokens_per_scale: list[torch.Tensor], num_scales: int | None = None) -> torch.Tensor:
        """Token ids -> image in [-1, 1]; `num_scales` < K decodes a coarse preview of the first scales."""
        return self.features_to_image(self.quantize.tokens_to_features(tokens_per_scale, num_scales))

    @torch.no_grad()
    def tokens_to_uint8_image(self, tokens_per_scale: list[torch.Tensor]) -> torch.Tensor:
        """Token ids -> (B, 3, H, W) uint8 in [0, 255], rounded: what PNGs and feature extractors take."""
        return self.tokens_to_image(tokens_per_scale).float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)

    def forward(self, images: torch.Tensor) -> VQVAEOutput:
        quantized = self.quantize(self.encode_features(images))
        reconstruction = self.decoder(self.post_quant_conv(quantized.features))
        return VQVAEOutput(reconstruction, quantized.vq_loss, quantized.tokens_per_scale,
                           quantized.codebook_usage_per_scale)
