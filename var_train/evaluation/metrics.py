"""FID, Inception Score and improved precision/recall of generated images, on every rank.

    metrics = GenerativeMetrics(extractor, reference, precision_recall=True)
    metrics.update(images_uint8, sample_indices)   # each rank: its own samples
    results = metrics.compute()                    # collective: {"fid", "inception_score", ...}

The images go through the feature extractor once; the features feed torchmetrics'
`FrechetInceptionDistance` and `InceptionScore` (through an identity "network", so torchmetrics
does the accumulation, the distributed sync at `compute()` and the maths) and the k-NN
precision/recall metric. Nothing is communicated during `update`; `compute` gathers once.

Results do not depend on how the samples were split over ranks: every sample carries its global
index, and the order-sensitive parts (IS's random split into 10 parts, precision/recall) sort by
it first; FID only sums.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.utilities import dim_zero_cat

from .features import ExtractedFeatures, FeatureExtractor
from .precision_recall import DEFAULT_NEIGHBOURHOOD, ImprovedPrecisionRecall
from .reference_stats import ReferenceStatistics

INCEPTION_SCORE_SPLITS = 10


class _Precomputed(nn.Module):
    """Hands already-extracted features to a torchmetrics metric that expects a network."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class OrderedInceptionScore(InceptionScore):
    """torchmetrics' Inception Score on precomputed logits, made independent of the rank split.

    torchmetrics keeps the logits in a list gathered element by element (`dist_reduce_fx=None`),
    which deadlocks when ranks made different numbers of updates; here they are concatenated
    ("cat") with their sample indices, sorted by index, and split after a seeded permutation."""

    def __init__(self, num_logits: int, splits: int = INCEPTION_SCORE_SPLITS, seed: int = 0, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            super().__init__(feature=_Precomputed(num_logits), splits=splits, **kwargs)
        self.seed = seed
        self.add_state("features", [], dist_reduce_fx="cat")
        self.add_state("sample_indices", [], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, sample_indices: torch.Tensor) -> None:  # type: ignore[override]
        self.features.append(logits.double())
        self.sample_indices.append(sample_indices.long())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        logits, indices = dim_zero_cat(self.features), dim_zero_cat(self.sample_indices)
        self.features = [logits[indices.argsort()]]
        # torchmetrics permutes with the global CPU generator: seed it inside a fork, so the
        # split is reproducible and the training run's random state is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.seed)
            return super().compute()


class GenerativeMetrics:
    """FID (with a reference), IS (with a classifier head), precision/recall (with reference
    features, when asked) of the images given to `update` on all ranks."""

    def __init__(self, extractor: FeatureExtractor, reference: ReferenceStatistics | None = None, *,
                 precision_recall: bool = False, inception_score: bool = True,
                 splits: int = INCEPTION_SCORE_SPLITS, neighbourhood: int = DEFAULT_NEIGHBOURHOOD,
                 device: torch.device | str | None = None):
        self.extractor = extractor
        self.device = torch.device(device) if device is not None else next(extractor.parameters()).device
        self.fid: FrechetInceptionDistance | None = None
        self.inception_score: OrderedInceptionScore | None = None
        self.precision_recall: ImprovedPrecisionRecall | None = None
        self._updated = False
        if reference is not None:
            reference.check_extractor(extractor)
            self.fid = FrechetInceptionDistance(feature=_Precomputed(extractor.num_features),
                                                reset_real_features=False).to(self.device)
            self._load_real_moments(reference)
            if precision_recall:
                if reference.features is None:
                    raise ValueError(f"precision/recall need per-image reference features; {reference.source} "
                                     f"has only mu/sigma")
                self.precision_recall = ImprovedPrecisionRecall(
                    torch.from_numpy(reference.features), k=neighbourhood).to(self.device)
        elif precision_recall:
            raise ValueError("precision/recall need a reference (stats .npz with features, ADM batch or image folder)")
        if inception_score and extractor.num_logits is not None:
            self.inception_score = OrderedInceptionScore(extractor.num_logits, splits=splits).to(self.device)

    def _load_real_moments(self, reference: ReferenceStatistics) -> None:
        """Put mu/sigma into torchmetrics' running sums. The sync at compute() adds the ranks'
        sums, so only rank 0 holds them (the others keep zeros). Count 2 is enough for
        torchmetrics to give back exactly mu and sigma (sum = 2 mu; cov_sum = sigma + 2 mu mu^T)
        with the least cancellation; FID depends only on the moments."""
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        mu = torch.from_numpy(reference.mu).double().to(self.device)
        sigma = torch.from_numpy(reference.sigma).double().to(self.device)
        self.fid.real_features_sum = 2 * mu
        self.fid.real_features_cov_sum = sigma + 2 * torch.outer(mu, mu)
        self.fid.real_features_num_samples = torch.tensor(2, device=self.device)

    @property
    def metric_names(self) -> list[str]:
        names = ["fid"] if self.fid is not None else []
        names += ["inception_score", "inception_score_std"] if self.inception_score is not None else []
        return names + (["precision", "recall"] if self.precision_recall is not None else [])

    def update(self, images: torch.Tensor, sample_indices: torch.Tensor) -> ExtractedFeatures:
        """Score this rank's images (uint8 or [0, 1] float) with their global sample indices."""
        extracted = self.extractor(images.to(self.device))
        self.update_features(extracted, sample_indices)
        return extracted

    def update_features(self, extracted: ExtractedFeatures, sample_indices: torch.Tensor) -> None:
        features = extracted.features.to(self.device, torch.float64)
        indices = sample_indices.to(self.device)
        if len(features) != len(indices):
            raise ValueError(f"{len(features)} feature rows but {len(indices)} sample indices")
        if self.fid is not None:
            self.fid.update(features, real=False)
        if self.inception_score is not None:
            self.inception_score.update(extracted.logits.to(self.device), indices)
        if self.precision_recall is not None:
            self.precision_recall.update(features, indices)
        self._updated = True

    def compute(self) -> dict[str, float]:
        """Collective: gathers every rank's accumulated state once per metric and returns the same
        numbers on every rank."""
        if not self._updated:  # a rank without samples still joins the gathers, with empty rows
            empty = ExtractedFeatures(torch.empty(0, self.extractor.num_features),
                                      torch.empty(0, self.extractor.num_logits or 1))
            self.update_features(empty, torch.empty(0, dtype=torch.long))
        results: dict[str, float] = {}
        if self.fid is not None:
            results["fid"] = float(self.fid.compute())
        if self.inception_score is not None:
            mean, std = self.inception_score.compute()
            results["inception_score"], results["inception_score_std"] = float(mean), float(std)
        if self.precision_recall is not None:
            results.update({k: float(v) for k, v in self.precision_recall.compute().items()})
        return results

    def reset(self) -> None:
        for metric in (self.fid, self.inception_score, self.precision_recall):
            if metric is not None:
                metric.reset()  # FID keeps its real moments (reset_real_features=False)
        self._updated = False
