"""Losses for training the multi-scale VQVAE beyond reconstruction + VQ terms.

- Perceptual: LPIPS (VGG16 variant) built from torchvision's VGG16 and LPIPS' linear heads, both
  read from local files (nothing is downloaded): `vgg16_weights` is torchvision's
  `vgg16-397923af.pth` (or any state dict with its `features.*` keys), `lpips_weights` the LPIPS
  package's `weights/v0.1/vgg.pth` (keys `lin0.model.1.weight` .. `lin4.model.1.weight`).
- Adversarial: a PatchGAN discriminator trained with the hinge loss; it needs no pretrained weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.vgg import cfgs, make_layers

from var_train.errors import MismatchError, MissingInputError
from var_train.models.checkpoint_io import read_weights

# torchvision VGG16 `features` indices right after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_VGG16_TAPS = (3, 8, 15, 22, 29)
_VGG16_TAP_CHANNELS = (64, 128, 256, 512, 512)


def reconstruction_losses(reconstruction: torch.Tensor, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pixel losses in the [-1, 1] image space; the caller weights them."""
    return {"reconstruction_l1": F.l1_loss(reconstruction, images),
            "reconstruction_l2": F.mse_loss(reconstruction, images)}


def _load_state_dict_file(path: str | Path, what: str, flag: str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{what} not found: {path} (pass a local file with {flag}; nothing is downloaded)")
    state, _ = read_weights(path)
    if not isinstance(state, dict):
        raise MismatchError(f"{path} is not a state dict ({what})")
    return state


class LPIPS(nn.Module):
    """Learned perceptual distance (Zhang et al. 2018), VGG16 variant; frozen, inputs in [-1, 1]."""

    def __init__(self, vgg16_weights: str | Path, lpips_weights: str | Path):
        super().__init__()
        vgg_state = _load_state_dict_file(vgg16_weights, "VGG16 weights", "--vgg16-weights")
        features = {k[len("features."):]: v for k, v in vgg_state.items() if k.startswith("features.")}
        vgg = make_layers(cfgs["D"], batch_norm=False)[: _VGG16_TAPS[-1] + 1]  # VGG16's `features`
        missing, unexpected = vgg.load_state_dict(features or vgg_state, strict=False)
        if missing:
            raise MismatchError(f"{vgg16_weights} lacks VGG16 feature weights: {missing[:6]} ...")
        self.stages = nn.ModuleList()
        start = 0
        for tap in _VGG16_TAPS:
            self.stages.append(vgg[start: tap + 1])
            start = tap + 1
        lin_state = _load_state_dict_file(lpips_weights, "LPIPS linear-layer weights", "--lpips-weights")
        self.heads = nn.ModuleList()
        for i, channels in enumerate(_VGG16_TAP_CHANNELS):
            key = f"lin{i}.model.1.weight"
            if key not in lin_state or lin_state[key].shape != (1, channels, 1, 1):
                raise MismatchError(f"{lpips_weights} is not LPIPS' vgg.pth: needs {key} of shape (1, {channels}, 1, 1)")
            head = nn.Conv2d(channels, 1, 1, bias=False)
            head.weight.data.copy_(lin_state[key])
            self.heads.append(head)
        # LPIPS' input normalisation (ImageNet statistics expressed for [-1, 1] inputs).
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # frozen: never in training mode

    def forward(self, images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """-> mean LPIPS distance over the batch (a scalar)."""
        a, b = (images - self.shift) / self.scale, (reconstruction - self.shift) / self.scale
        distance = images.new_zeros(())
        for stage, head in zip(self.stages, self.heads):
            a, b = stage(a), stage(b)
            na = a / (a.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            nb = b / (b.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            distance = distance + head((na - nb).square()).mean()
        return distance


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): strided convs scoring overlapping patches as real/fake.

    GroupNorm instead of BatchNorm keeps it independent of the per-rank batch under DDP."""

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = base_channels
        for i in range(1, num_layers + 1):
            out_channels = base_channels * min(2 ** i, 8)
            stride = 2 if i < num_layers else 1
            layers += [nn.Conv2d(channels, out_channels, 4, stride, 1, bias=False),
                       nn.GroupNorm(32, out_channels), nn.LeakyReLU(0.2)]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, 4, 1, 1))
        self.layers = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()
