"""Feature extractors for FID, IS and precision/recall: one interface, two implementations.

A `FeatureExtractor` maps a batch of images to `(N, D)` features (FID, precision/recall) and,
when it is a classifier, `(N, C)` logits (Inception Score, class accuracy):

- `InceptionFeatureExtractor`: torch-fidelity's port of the TF Inception v3 used by every
  published FID (pool_3, D=2048; unbiased logits, C=1008, for IS). torch-fidelity's own forward
  resizes with the TF1-compatible bilinear kernel, i.e. torchmetrics' `antialias=False`, so the
  numbers stay comparable with OpenAI's ADM evaluator. The weights are read from a local file
  only; a missing file is a `MissingInceptionWeightsError` saying where to put it (torch-fidelity
  would otherwise try to download, which hangs on a machine without network).
- `ClassifierFeatureExtractor` (classifier.py): a small CNN trained on the dataset itself, for
  data sets that Inception features describe badly (the 64px digits of the demo).

`build_feature_extractor("inception" | path/to/classifier.safetensors)` picks one.
"""

from __future__ import annotations

import io
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         + INCEPTION_WEIGHTS_FILENAME)
INCEPTION_FEATURE_LAYER = "2048"
INCEPTION_LOGITS_LAYER = "logits_unbiased"  # what torch-fidelity, torchmetrics and ADM use for IS


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


# -- Inception -------------------------------------------------------------------------------------
class MissingInceptionWeightsError(FileNotFoundError):
    pass


def default_inception_weights_path() -> Path:
    """`$TORCH_HOME/hub/checkpoints/<file>`: where torch.hub (and so torch-fidelity) caches it."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME


def resolve_inception_weights(path: str | Path | None = None) -> Path:
    """The weights file to use: `path`, else the torch.hub cache; missing -> a clear error."""
    candidate = Path(path) if path else default_inception_weights_path()
    if candidate.is_file():
        return candidate
    raise MissingInceptionWeightsError(
        f"Inception weights not found at {candidate}.\n"
        f"FID/IS/precision/recall with the Inception network need torch-fidelity's weights file "
        f"{INCEPTION_WEIGHTS_FILENAME} (95 MB). Nothing is downloaded at run time: on a machine with "
        f"network fetch {INCEPTION_WEIGHTS_URL}\nand either put it at {default_inception_weights_path()} "
        f"(the TORCH_HOME cache; set TORCH_HOME to move it) or pass its path "
        f"(--inception-weights / eval.inception_weights). Or score with a classifier checkpoint "
        f"instead (--feature-extractor path/to/classifier.safetensors).")


def _load_inception_state_dict(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "fc.weight" not in state or "Conv2d_1a_3x3.conv.weight" not in state:
        raise ValueError(f"{path} is not torch-fidelity's Inception v3 state dict "
                         f"({INCEPTION_WEIGHTS_FILENAME})")
    return state


def _torch_fidelity_network(state_dict: dict[str, torch.Tensor] | None) -> nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3 with pool_3 features and unbiased logits.

    Its constructor always loads weights itself, with `torch.load(weights_only=False)` or a
    download. We hand it an in-memory copy of a state dict already read with
    `weights_only=True`. `state_dict=None` keeps the random initialisation (the same network,
    untrained: for tests and plumbing only; its numbers mean nothing)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Network(FeatureExtractorInceptionV3):
        def load_state_dict(self, state, strict=True, assign=False):
            if state_dict is None:  # asked for the untrained network: keep the constructor's init
                return nn.modules.module._IncompatibleKeys([], [])
            return super().load_state_dict(state, strict=strict, assign=assign)

    buffer = io.BytesIO()
    torch.save(state_dict or {}, buffer)
    buffer.seek(0)
    return _Network("inception-v3-compat", [INCEPTION_FEATURE_LAYER, INCEPTION_LOGITS_LAYER],
                    feature_extractor_weights_path=buffer)


class InceptionFeatureExtractor(FeatureExtractor):
    """torch-fidelity's Inception v3 (TF-compatible resize to 299 = torchmetrics antialias=False)."""

    name = "inception-v3-compat"
    num_features = 2048
    num_logits = 1008

    def __init__(self, weights_path: str | Path | None = None, *, random_init: bool = False):
        super().__init__()
        if random_init:
            self.network = _torch_fidelity_network(None)
            self.name = "inception-v3-compat-untrained"
        else:
            self.network = _torch_fidelity_network(_load_inception_state_dict(resolve_inception_weights(weights_path)))
        self.network.requires_grad_(False)
        self.eval()

    def extract(self, images: torch.Tensor) -> ExtractedFeatures:
        features, logits = self.network(images)
        return ExtractedFeatures(features.float(), logits.float())


def build_feature_extractor(spec: str = "inception", *, inception_weights: str | Path | None = None,
                            device: torch.device | str = "cpu") -> FeatureExtractor:
    """"inception" (torch-fidelity's network; weights from `inception_weights` or the TORCH_HOME
    cache) or the path of a classifier checkpoint written by `train_classifier`."""
    if spec == "inception":
        extractor: FeatureExtractor = InceptionFeatureExtractor(inception_weights)
    else:
        from .classifier import ClassifierFeatureExtractor

        if not os.path.isfile(spec):
            raise FileNotFoundError(f"feature extractor {spec!r} is neither 'inception' nor an existing "
                                    f"classifier checkpoint (write one with var_train.evaluation.classifier."
                                    f"train_classifier)")
        extractor = ClassifierFeatureExtractor.load(spec)
    return extractor.to(device).eval()


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
