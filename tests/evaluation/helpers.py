"""Small, fast stand-ins shared by the evaluation tests: a seeded (untrained) classifier extractor
and synthetic image sets whose statistics we control."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from var_train.evaluation.classifier import ClassifierConfig, ClassifierFeatureExtractor
from var_train.evaluation.features import ExtractedFeatures, FeatureExtractor


class PooledPixelExtractor(FeatureExtractor):
    """Features = the image average-pooled to 4x4 (48 values in [0, 1]); logits = a fixed seeded
    projection of them. Its statistics move predictably with the images (a brightness shift moves
    the mean), which makes metric behaviour checkable."""

    name = "pooled-pixels"
    num_features = 48

    def __init__(self, num_logits: int = 10, seed: int = 0):
        super().__init__()
        self.num_logits = num_logits
        generator = torch.Generator().manual_seed(seed)
        self.projection = torch.nn.Parameter(torch.randn(48, num_logits, generator=generator) * 4, requires_grad=False)

    def extract(self, images: torch.Tensor) -> ExtractedFeatures:
        features = F.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)
        return ExtractedFeatures(features, (features - 0.5) @ self.projection)


def seeded_classifier(seed: int = 0, num_classes: int = 10) -> ClassifierFeatureExtractor:
    """The small CNN with random (seeded, so identical on every rank) weights: a deterministic
    feature map, which is all the metric maths needs."""
    torch.manual_seed(seed)
    config = ClassifierConfig(num_classes=num_classes, class_names=[str(i) for i in range(num_classes)],
                              input_size=16, width=8, feature_dim=16)
    return ClassifierFeatureExtractor(config, name_suffix=f"seed{seed}").eval()


def blob_images(count: int, seed: int, brightness: float = 0.5, size: int = 16) -> torch.Tensor:
    """uint8 (count, 3, size, size): random smooth colour fields around `brightness`."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=generator) * 0.5 + (brightness - 0.25)
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return fine.clamp(0, 1).mul(255).round().to(torch.uint8)
