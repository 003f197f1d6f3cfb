"""Feature extractors for FID, IS and precision/recall: one interface and a registry.

A `FeatureExtractor` maps a batch of images to `(N, D)` features (FID, precision/recall) and,
when it is a classifier, `(N, C)` logits (Inception Score, class accuracy). Implementations live
in their own modules and register themselves here (this module imports none of them):

- inception.py: torch-fidelity's Inception v3, the network of every published FID ("inception").
- classifier.py: a small CNN trained on the data set itself, for data sets that Inception
  features describe badly (the digits of the demo): a `.safetensors` checkpoint path.

`build_feature_extractor(spec)` asks each registered kind whether it takes `spec` (a name or a
path). Adding an extractor: a module in evaluation/ that calls `register_extractor`, imported by
the package's `__init__`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from var_train.errors import MissingInputError


@dataclass
class ExtractedFeatures:
    features: torch.Tensor              # (N, D) float32
    logits: torch.Tensor | None = None  # (N, C) float32, None for extractors without a classifier


def to_uint8_images(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 in [0, 255] (returned as is) or float in [0, 1] -> uint8, rounded."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
    return images.float().mul(255).round_().clamp_(0, 255).to(torch.uint8)


class FeatureExtractor(nn.Module, ABC):
    """uint8 (or [0, 1] float) images (N, 3, H, W) -> ExtractedFeatures. Always in eval mode,
    never trained by the metrics, no gradients."""

    name: str = "feature-extractor"
    num_features: int
    num_logits: int | None = None  # None: no classifier head, so no IS / class accuracy

    @abstractmethod
    def extract(self, images: torch.Tensor) -> ExtractedFeatures:
        """uint8 images on the extractor's device -> features (and logits)."""

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> ExtractedFeatures:
        device = next(self.parameters()).device
        return self.extract(to_uint8_images(images).to(device))

    def train(self, mode: bool = True) -> "FeatureExtractor":
        return super().train(False)  # batch-norm statistics of the scorer must never move

    def describe(self) -> dict:
        """Identifies the extractor in saved statistics, so stats from another one are refused."""
        return {"extractor": self.name, "num_features": self.num_features}


# -- the registry ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExtractorKind:
    name: str
    accepts: Callable[[str], bool]                         # does this kind take the spec?
    build: Callable[..., FeatureExtractor]                 # build(spec, inception_weights=...)
    description: str                                       # for the error when no kind takes a spec


_KINDS: dict[str, ExtractorKind] = {}


def register_extractor(kind: ExtractorKind) -> ExtractorKind:
    _KINDS[kind.name] = kind
    return kind


def registered_extractors() -> list[str]:
    return list(_KINDS)


def build_feature_extractor(spec: str = "inception", *, inception_weights: str | Path | None = None,
                            device: torch.device | str = "cpu") -> FeatureExtractor:
    """The extractor `spec` names: "inception", or the path of a classifier checkpoint written by
    `train_classifier` (see the registered kinds)."""
    for kind in _KINDS.values():
        if kind.accepts(str(spec)):
            extractor = kind.build(str(spec), inception_weights=inception_weights)
            return extractor.to(device).eval()
    accepted = " nor ".join(kind.description for kind in _KINDS.values())
    raise MissingInputError(f"feature extractor {spec!r} is neither {accepted}")


@torch.no_grad()
def extract_in_batches(extractor: FeatureExtractor, images: torch.Tensor, batch_size: int = 100) -> ExtractedFeatures:
    """All of `images` (on any device) through `extractor` in batches; results on the CPU."""
    features, logits = [], []
    for start in range(0, len(images), batch_size):
        out = extractor(images[start:start + batch_size])
        features.append(out.features.cpu())
        if out.logits is not None:
            logits.append(out.logits.cpu())
    if not features:
        return ExtractedFeatures(torch.empty(0, extractor.num_features),
                                 torch.empty(0, extractor.num_logits) if extractor.num_logits else None)
    return ExtractedFeatures(torch.cat(features), torch.cat(logits) if logits else None)
