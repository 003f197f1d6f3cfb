"""Multi-scale residual quantizer of VAR's VQVAE: one shared codebook, K scales, phi convolutions.

An image's feature map f (B, z, H, W) on the final scale's grid is explained coarse to fine:
scale k quantizes the area-downsampled residual to a pn_k x pn_k token map, upsamples its code
vectors back to H x W (bicubic), refines them with a phi convolution and subtracts them from the
residual. The same quantities rebuild the transformer's teacher-forcing input from token ids,
which is all the trainer needs: this module holds only the codebook and the phi convs (~168k
parameters at the released size), so it loads without the 109M-parameter encoder/decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


class Phi(nn.Conv2d):
    """phi(h) = (1 - r) * h + r * conv3x3(h), r = 0.5: a residual refinement of upsampled codes."""

    def __init__(self, channels: int, residual_ratio: float = 0.5):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.residual_ratio = residual_ratio

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.residual_ratio) + super().forward(h).mul_(self.residual_ratio)


class PartiallySharedPhi(nn.Module):
    """n phi convs shared by K scales; scale k uses the conv whose tick is nearest to k/(K-1)."""

    def __init__(self, channels: int, count: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList([Phi(channels) for _ in range(count)])
        # The reference spaces 4 convs at 1/12..11/12 and any other count at 1/(2n)..1-1/(2n).
        margin = 1 / (3 * count) if count == 4 else 1 / (2 * count)
        self.ticks = np.linspace(margin, 1 - margin, count)  # float64: keeps the reference's tie-breaks

    def for_scale(self, scale_index: int, num_scales: int) -> Phi:
        position = scale_index / (num_scales - 1) if num_scales > 1 else 0.0
        return self.qresi_ls[int(np.argmin(np.abs(self.ticks - position)))]


@dataclass
class QuantizerOutput:
    features: torch.Tensor  # (B, z, H, W) quantized, with straight-through gradients to the input
    vq_loss: torch.Tensor  # scalar: codebook + beta * commitment, averaged over scales
    tokens_per_scale: list[torch.Tensor]  # K x (B, pn*pn) int64
    codebook_usage_per_scale: list[float]  # fraction of the vocabulary hit by this batch, per scale


class MultiScaleQuantizer(nn.Module):
    def __init__(self, vocab_size: int = 4096, z_channels: int = 32, share_quant_resi: int = 4,
                 patch_nums: tuple[int, ...] = DEFAULT_PATCH_NUMS, beta: float = 0.25):
        super().__init__()
        if share_quant_resi < 1:
            raise ValueError(f"share_quant_resi must be >= 1 (number of phi convs), got {share_quant_resi}")
        self.vocab_size, self.z_channels, self.beta = vocab_size, z_channels, beta
        self.patch_nums = tuple(int(p) for p in patch_nums)
        self.num_tokens = sum(p * p for p in self.patch_nums)
        self.config = dict(vocab_size=vocab_size, z_channels=z_channels,
                           share_quant_resi=share_quant_resi, patch_nums=list(self.patch_nums), beta=beta)
        self.embedding = nn.Embedding(vocab_size, z_channels)
        self.embedding.weight.data.uniform_(-1 / vocab_size, 1 / vocab_size)
        self.quant_resi = PartiallySharedPhi(z_channels, share_quant_resi)
        # Running per-scale codebook hit rates: kept for state-dict compatibility and usage metrics.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), vocab_size))

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    def phi(self, scale_index: int) -> Phi:
        return self.quant_resi.for_scale(scale_index, self.num_scales)

    # -- shared building blocks -------------------------------------------------------------
    def nearest_codes(self, vectors: torch.Tensor) -> torch.Tensor:
        """(N, z) -> (N,) ids of the nearest codebook entries (squared Euclidean distance)."""
        codebook = self.embedding.weight.detach()
        distances = vectors.square().sum(dim=1, keepdim=True) + codebook.square().sum(dim=1)
        distances.addmm_(vectors, codebook.T, alpha=-2, beta=1)
        return distances.argmin(dim=1)

    def _upsampled_residual(self, scale_index: int, codes: torch.Tensor, size: int) -> torch.Tensor:
        """codes (B, z, pn, pn) -> phi_k(bicubic-upsample(codes)) on the final (size x size) grid."""
        if scale_index != self.num_scales - 1:
            codes = F.interpolate(codes, size=(size, size), mode="bicubic")
        return self.phi(scale_index)(codes)

    def _token_map_codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, pn*pn) ids -> (B, z, pn, pn) code vectors."""
        batch, length = tokens.shape
        side = round(length ** 0.5)
        return self.embedding(tokens).transpose(1, 2).reshape(batch, self.z_channels, side, side)

    # -- token ids <-> features ----------------------------------------------------------------
    @torch.no_grad()
    def features_to_tokens(self, features: torch.Tensor) -> list[torch.Tensor]:
        """f (B, z, H, W) -> K x (B, pn*pn) token ids, coarse to fine."""
        batch, channels, height, width = features.shape
        residual = features.detach().float().clone()
        tokens_per_scale = []
        for k, pn in enumerate(self.patch_nums):
            last = k == self.num_scales - 1
            pooled = residual if last else F.interpolate(residual, size=(pn, pn), mode="area")
            ids = self.nearest_codes(pooled.permute(0, 2, 3, 1).reshape(-1, channels))
            ids = ids.view(batch, pn * pn)
            residual.sub_(self._upsampled_residual(k, self._token_map_codes(ids), height))
            tokens_per_scale.append(ids)
        return tokens_per_scale

    def tokens_to_features(self, tokens_per_scale: list[torch.Tensor], num_scales: int | None = None) -> torch.Tensor:
        """Sum of phi_k(upsampled codes) over the first `num_scales` scales -> f_hat (B, z, H, W)."""
        num_scales = len(tokens_per_scale) if num_scales is None else num_scales
        final = self.patch_nums[-1]
        f_hat = None
        for k in range(num_scales):
            h = self._upsampled_residual(k, self._token_map_codes(tokens_per_scale[k]), final)
            f_hat = h if f_hat is None else f_hat + h
        return f_hat

    def tokens_to_teacher_input(self, tokens_per_scale: list[torch.Tensor]) -> torch.Tensor:
        """K x (B, pn*pn) ids -> (B, L - pn_1^2, z): for each scale k+1, the running f_hat of
        scales 0..k area-downsampled to pn_{k+1}; the transformer's input for scale k+1."""
        final = self.patch_nums[-1]
        batch = tokens_per_scale[0].shape[0]
        f_hat = torch.zeros(batch, self.z_channels, final, final, device=tokens_per_scale[0].device)
        next_inputs = []
        for k in range(self.num_scales - 1):
            f_hat = f_hat + self._upsampled_residual(k, self._token_map_codes(tokens_per_scale[k]), final)
            next_pn = self.patch_nums[k + 1]
            pooled = F.interpolate(f_hat, size=(next_pn, next_pn), mode="area")
            next_inputs.append(pooled.flatten(2).transpose(1, 2))
        return torch.cat(next_inputs, dim=1)

    def next_autoregressive_input(self, scale_index: int, f_hat: torch.Tensor,
                                  codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sampling step: add scale k's codes (B, z, pn, pn) to f_hat in place; return f_hat and the
        next scale's input (B, pn_{k+1}^2, z), or None after the last scale."""
        f_hat.add_(self._upsampled_residual(scale_index, codes, self.patch_nums[-1]))
        if scale_index == self.num_scales - 1:
            return f_hat, None
        next_pn = self.patch_nums[scale_index + 1]
        pooled = F.interpolate(f_hat, size=(next_pn, next_pn), mode="area")
        return f_hat, pooled.flatten(2).transpose(1, 2)

    # -- training (tokenizer) -----------------------------------------------------------------
    def forward(self, features: torch.Tensor) -> QuantizerOutput:
        """Quantize with straight-through gradients; vq loss as in VQ-VAE over all scales."""
        features = features.float()
        batch, channels, height, width = features.shape
        target = features.detach()
        residual = target.clone()
        f_hat = torch.zeros_like(target)
        vq_loss = features.new_zeros(())
        tokens_per_scale, usage = [], []
        with torch.autocast(device_type=features.device.type, enabled=False):
            for k, pn in enumerate(self.patch_nums):
                last = k == self.num_scales - 1
                pooled = residual if last else F.interpolate(residual, size=(pn, pn), mode="area")
                ids = self.nearest_codes(pooled.permute(0, 2, 3, 1).reshape(-1, channels))
                hits = torch.bincount(ids, minlength=self.vocab_size).float()
                if self.training:
                    self.ema_vocab_hit_SV[k].mul_(0.99).add_(hits, alpha=0.01)
                usage.append((hits > 0).float().mean().item())
                ids = ids.view(batch, pn * pn)
                h = self._upsampled_residual(k, self._token_map_codes(ids), height)
                f_hat = f_hat + h
                residual = residual - h.detach()
                vq_loss = vq_loss + self.beta * F.mse_loss(f_hat.detach(), features) + F.mse_loss(f_hat, target)
                tokens_per_scale.append(ids)
        vq_loss = vq_loss / self.num_scales
        straight_through = (f_hat.detach() - target) + features
        return QuantizerOutput(straight_through, vq_loss, tokens_per_scale, usage)
