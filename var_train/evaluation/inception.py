"""torch-fidelity's Inception v3 as a feature extractor: the network of every published FID.

It is torch-fidelity's port of the TF Inception v3 (pool_3 features, D=2048; unbiased logits,
C=1008, for IS). torch-fidelity's own forward resizes with the TF1-compatible bilinear kernel,
i.e. torchmetrics' `antialias=False`, so the numbers stay comparable with OpenAI's ADM evaluator.
The weights are read from a local file only; a missing file is a `MissingInceptionWeightsError`
saying where to put it (torch-fidelity would otherwise try to download, which hangs on a machine
without network). Registered as the extractor "inception".
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
import torch.nn as nn

from var_train.errors import MismatchError, MissingInputError
from var_train.models.checkpoint_io import read_weights

from .features import ExtractedFeatures, ExtractorKind, FeatureExtractor, register_extractor

INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         + INCEPTION_WEIGHTS_FILENAME)
INCEPTION_FEATURE_LAYER = "2048"
INCEPTION_LOGITS_LAYER = "logits_unbiased"  # what torch-fidelity, torchmetrics and ADM use for IS


class MissingInceptionWeightsError(MissingInputError):  # a user error: one line `error: ...`, exit 2
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
    state, _ = read_weights(path)
    if not isinstance(state, dict) or "fc.weight" not in state or "Conv2d_1a_3x3.conv.weight" not in state:
        raise MismatchError(f"{path} is not torch-fidelity's Inception v3 state dict "
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


register_extractor(ExtractorKind(
    name="inception", accepts=lambda spec: spec == "inception",
    build=lambda spec, inception_weights=None: InceptionFeatureExtractor(inception_weights),
    description="'inception' (torch-fidelity's Inception v3, weights from --inception-weights or $TORCH_HOME)"))
