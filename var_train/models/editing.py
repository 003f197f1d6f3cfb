"""Zero-shot in-painting, out-painting and class-conditional editing with a trained VAR.

As in the paper: the image is tokenized once; then the usual coarse-to-fine sampling runs, but at
every scale the tokens outside the edit mask are teacher-forced from the image's own tokens and only
the masked ones are drawn. Forced tokens feed the next scale exactly as in training, so the sampled
region is generated in the context of the kept one. No training is involved.

- in-painting: mask a region inside the image; out-painting: mask the border; class-conditional
  editing: mask a region and sample it with another class label.
- The pixel mask (True = regenerate) is carried to each scale's pn x pn grid by max-pooling: a
  token is regenerated if any pixel it covers is masked, so the coarse scales (1x1, 2x2) usually
  regenerate entirely and the edit blends in. An all-False mask reproduces the image's tokens.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .sampling import SamplingSettings, sample_generator, sample_tokens, sampling_autocast
from .var import VAR
from .vqvae import VQVAE


def masks_per_scale(mask: torch.Tensor, patch_nums: Sequence[int]) -> list[torch.Tensor]:
    """mask (B, H, W) bool, True = regenerate -> K x (B, pn*pn) bool, row-major like the tokens."""
    if mask.dim() != 3:
        raise ValueError(f"mask must be (B, H, W), got shape {tuple(mask.shape)}")
    pixels = mask.float().unsqueeze(1)
    return [F.adaptive_max_pool2d(pixels, pn).flatten(1) > 0 for pn in patch_nums]


def box_mask(resolution: int, box: Sequence[int], batch: int = 1) -> torch.Tensor:
    """(x0, y0, x1, y1) in pixels, x1/y1 exclusive -> (batch, R, R) bool mask, True inside the box."""
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= resolution and 0 <= y0 < y1 <= resolution):
        raise ValueError(f"box {tuple(box)} must satisfy 0 <= x0 < x1 <= {resolution} and 0 <= y0 < y1 <= {resolution}")
    mask = torch.zeros(batch, resolution, resolution, dtype=torch.bool)
    mask[:, y0:y1, x0:x1] = True
    return mask


@torch.no_grad()
def edit_tokens(var: VAR, quantizer, image_tokens: list[torch.Tensor], scale_masks: list[torch.Tensor],
                labels: torch.Tensor, cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0,
                generator=None) -> list[torch.Tensor]:
    """Sample `labels` (B,) with the image's tokens (K x (B, pn*pn)) forced wherever the scale's
    mask (K x (B, pn*pn) bool) is False -> K x (B, pn*pn) token ids."""
    if len(image_tokens) != len(var.patch_nums) or len(scale_masks) != len(var.patch_nums):
        raise ValueError(f"expected {len(var.patch_nums)} scales of tokens and masks, got "
                         f"{len(image_tokens)} and {len(scale_masks)}")

    def keep_outside_mask(k: int, drawn: torch.Tensor) -> torch.Tensor:
        return torch.where(scale_masks[k].to(drawn.device), drawn, image_tokens[k].to(drawn.device))

    return sample_tokens(var, quantizer, labels, cfg=cfg, top_k=top_k, top_p=top_p, generator=generator,
                         choose_tokens=keep_outside_mask)


@torch.no_grad()
def edit_images(var: VAR, vae: VQVAE, images: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                settings: SamplingSettings = SamplingSettings(), first_index: int = 0) -> tuple[torch.Tensor, list, list]:
    """images (B, 3, R, R) in [-1, 1], mask (B, R, R) bool (True = regenerate), labels (B,) ->
    (edited uint8 images (B, 3, R, R), edited tokens, the images' own tokens). Row b draws from
    the generator of sample index `first_index + b`, as `var-train sample` does."""
    if tuple(vae.patch_nums) != tuple(var.patch_nums):
        raise ValueError(f"the VQVAE runs patch_nums {vae.patch_nums}, the VAR {var.patch_nums}: "
                         f"load the VQVAE with the VAR's schedule (load_vae(path, patch_nums=var.patch_nums))")
    device = images.device
    image_tokens = vae.image_to_tokens(images)
    scale_masks = masks_per_scale(mask.to(device), var.patch_nums)
    generators = [sample_generator(settings.seed, first_index + b, device) for b in range(images.shape[0])]
    with sampling_autocast(var, device, settings.precision):
        tokens = edit_tokens(var, vae.quantize, image_tokens, scale_masks, labels.to(device), cfg=settings.cfg,
                             top_k=settings.top_k, top_p=settings.top_p, generator=generators)
    return vae.tokens_to_uint8_image(tokens), tokens, image_tokens
