"""FID, Inception Score, improved precision/recall and class accuracy of generated images, on every rank.

    metrics = GenerativeMetrics(extractor, reference, precision_recall=True, num_classes=10)
    metrics.update(images_uint8, sample_indices, labels)   # each rank: its own samples
    results = metrics.compute()                             # collective: {"fid", "inception_score", ...}

Every metric follows one protocol, `SampleMetric`: `update(extracted, sample_indices, labels)`
with the extractor's output for a batch, `compute()` (collective) -> {name: value}, `reset()`.
The images go through the feature extractor once (in `GenerativeMetrics.update`) and every
metric reads what it needs: FID and IS go through torchmetrics (through an identity "network", so
torchmetrics does the accumulation, the distributed sync at `compute()` and the maths),
precision/recall is the k-NN metric of precision_recall.py, class accuracy a torchmetrics sum.
Adding a metric: a class with the three methods here, switched on in `GenerativeMetrics`.
Nothing is communicated during `update`; `compute` gathers once per metric.

Results do not depend on how the samples were split over ranks: every sample carries its global
index, and the order-sensitive parts (IS's random split into 10 parts, precision/recall) sort by
it first; FID and class accuracy only sum.
"""

from __future__ import annotations

import warnings
from typing import Protocol

import torch
import torch.nn as nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.utilities import dim_zero_cat

from var_train.errors import ConfigError
from var_train.parallel.distributed import get_rank

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


class SampleMetric(Protocol):
    """The protocol of every metric of generated samples."""

    def update(self, extracted: ExtractedFeatures, sample_indices: torch.Tensor,
               labels: torch.Tensor | None) -> None: ...

    def compute(self) -> dict[str, float]: ...  # collective when a process group exists

    def reset(self) -> None: ...


class FrechetDistance:
    """FID against reference moments (torchmetrics; only rank 0 holds the real moments)."""

    def __init__(self, reference: ReferenceStatistics, num_features: int, device: torch.device):
        self.metric = FrechetInceptionDistance(feature=_Precomputed(num_features),
                                               reset_real_features=False).to(device)
        self._load_real_moments(reference, device)

    def _load_real_moments(self, reference: ReferenceStatistics, device: torch.device) -> None:
        """Put mu/sigma into torchmetrics' running sums. The sync at compute() adds the ranks'
        sums, so only rank 0 holds them (the others keep zeros). Count 2 is enough for
        torchmetrics to give back exactly mu and sigma (sum = 2 mu; cov_sum = sigma + 2 mu mu^T)
        with the least cancellation; FID depends only on the moments."""
        if get_rank() != 0:
            return
        mu = torch.from_numpy(reference.mu).double().to(device)
        sigma = torch.from_numpy(reference.sigma).double().to(device)
        self.metric.real_features_sum = 2 * mu
        self.metric.real_features_cov_sum = sigma + 2 * torch.outer(mu, mu)
        self.metric.real_features_num_samples = torch.tensor(2, device=device)

    def update(self, extracted, sample_indices, labels) -> None:
        self.metric.update(extracted.features.to(self.metric.device, torch.float64), real=False)

    def compute(self) -> dict[str, float]:
        return {"fid": float(self.metric.compute())}

    def reset(self) -> None:
        self.metric.reset()  # keeps the real moments (reset_real_features=False)


class InceptionScoreOfLogits:
    """Inception Score of the extractor's logits, independent of the rank split."""

    def __init__(self, num_logits: int, splits: int, device: torch.device):
        self.metric = OrderedInceptionScore(num_logits, splits=splits).to(device)

    def update(self, extracted, sample_indices, labels) -> None:
        self.metric.update(extracted.logits.to(self.metric.device), sample_indices.to(self.metric.device))

    def compute(self) -> dict[str, float]:
        mean, std = self.metric.compute()
        return {"inception_score": float(mean), "inception_score_std": float(std)}

    def reset(self) -> None:
        self.metric.reset()


class PrecisionRecall:
    """Improved precision/recall (k-NN manifolds) against per-image reference features."""

    def __init__(self, reference: ReferenceStatistics, neighbourhood: int, device: torch.device):
        if reference.features is None:
            raise ConfigError(f"precision/recall need per-image reference features; {reference.source} "
                              f"has only mu/sigma")
        self.metric = ImprovedPrecisionRecall(torch.from_numpy(reference.features), k=neighbourhood).to(device)

    def update(self, extracted, sample_indices, labels) -> None:
        device = self.metric.device
        self.metric.update(extracted.features.to(device, torch.float64), sample_indices.to(device))

    def compute(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.metric.compute().items()}

    def reset(self) -> None:
        self.metric.reset()


class _ClassHits(Metric):
    """Per-class (recognised as their class, scored) counts, summed over ranks by torchmetrics."""

    full_state_update = False

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.add_state("correct", torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, predicted: torch.Tensor, labels: torch.Tensor) -> None:
        hits = (predicted == labels).double()
        self.correct += torch.bincount(labels, weights=hits, minlength=self.num_classes)[:self.num_classes]
        self.total += torch.bincount(labels, minlength=self.num_classes)[:self.num_classes].double()

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.correct, self.total


class ClassAccuracy:
    """How often the extractor's classifier recognises a sample as the class it was made for.

    -> {"class_accuracy": overall} plus, with `per_class`, {"class_accuracy/<name>": ...} for
    every class with samples. Needs an extractor whose logits are the model's classes.
    `synchronised=False`: this process's samples only (no collective at compute)."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu", *,
                 class_names: list[str] | None = None, per_class: bool = False, synchronised: bool = True):
        self.metric = _ClassHits(num_classes, sync_on_compute=synchronised).to(device)
        self.class_names, self.per_class = class_names, per_class

    def update(self, extracted: ExtractedFeatures, sample_indices, labels: torch.Tensor | None) -> None:
        if labels is None:
            raise ValueError("class accuracy needs the class each sample was generated for (labels)")
        if extracted.logits is None or len(extracted.logits) != len(labels):
            got = None if extracted.logits is None else len(extracted.logits)
            raise ValueError(f"{got} images but {len(labels)} labels")
        device = self.metric.device
        self.metric.update(extracted.logits.argmax(dim=1).to(device), labels.to(device).long())

    def compute(self) -> dict[str, float]:
        correct, total = (x.cpu() for x in self.metric.compute())
        overall = float(correct.sum() / total.sum()) if total.sum() > 0 else float("nan")
        result = {"class_accuracy": overall}
        if self.per_class:
            for label in torch.nonzero(total).flatten().tolist():
                names = self.class_names
                name = names[label] if names and label < len(names) else str(label)
                result[f"class_accuracy/{name}"] = float(correct[label] / total[label])
        return result

    def reset(self) -> None:
        self.metric.reset()


class GenerativeMetrics:
    """The metrics that apply, given the extractor and reference: FID (with a reference), IS (with
    a classifier head), precision/recall (with reference features, when asked), class accuracy
    (when the extractor classifies into the model's `num_classes`); all fed by one extraction."""

    def __init__(self, extractor: FeatureExtractor, reference: ReferenceStatistics | None = None, *,
                 precision_recall: bool = False, inception_score: bool = True,
                 splits: int = INCEPTION_SCORE_SPLITS, neighbourhood: int = DEFAULT_NEIGHBOURHOOD,
                 num_classes: int | None = None, class_names: list[str] | None = None,
                 per_class_accuracy: bool = False, device: torch.device | str | None = None):
        self.extractor = extractor
        self.device = torch.device(device) if device is not None else next(extractor.parameters()).device
        self.metrics: dict[str, SampleMetric] = {}
        self._updated = False
        if reference is not None:
            reference.check_extractor(extractor)
            self.metrics["fid"] = FrechetDistance(reference, extractor.num_features, self.device)
            if precision_recall:
                self.metrics["precision_recall"] = PrecisionRecall(reference, neighbourhood, self.device)
        elif precision_recall:
            raise ConfigError("precision/recall need a reference (stats .npz with features, ADM batch or image folder)")
        if inception_score and extractor.num_logits is not None:
            self.metrics["inception_score"] = InceptionScoreOfLogits(extractor.num_logits, splits, self.device)
        if num_classes is not None and extractor.num_logits == num_classes:
            self.metrics["class_accuracy"] = ClassAccuracy(num_classes, self.device, class_names=class_names,
                                                           per_class=per_class_accuracy)

    @property
    def metric_names(self) -> list[str]:
        return list(self.metrics)

    def update(self, images: torch.Tensor, sample_indices: torch.Tensor,
               labels: torch.Tensor | None = None) -> ExtractedFeatures:
        """Score this rank's images (uint8 or [0, 1] float) with their global sample indices (and
        the classes they were generated for, for class accuracy)."""
        extracted = self.extractor(images.to(self.device))
        self.update_features(extracted, sample_indices, labels)
        return extracted

    def update_features(self, extracted: ExtractedFeatures, sample_indices: torch.Tensor,
                        labels: torch.Tensor | None = None) -> None:
        if len(extracted.features) != len(sample_indices):
            raise ValueError(f"{len(extracted.features)} feature rows but {len(sample_indices)} sample indices")
        for metric in self.metrics.values():
            metric.update(extracted, sample_indices, labels)
        self._updated = True

    def compute(self) -> dict[str, float]:
        """Collective: gathers every rank's accumulated state once per metric and returns the same
        numbers on every rank."""
        if not self._updated:  # a rank without samples still joins the gathers, with empty rows
            empty = ExtractedFeatures(torch.empty(0, self.extractor.num_features),
                                      torch.empty(0, self.extractor.num_logits or 1))
            self.update_features(empty, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
        results: dict[str, float] = {}
        for metric in self.metrics.values():
            results.update(metric.compute())
        return results

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()
        self._updated = False
