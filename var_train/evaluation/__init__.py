"""Evaluation of generated images: FID, Inception Score, improved precision/recall, class accuracy.

- features.py: the `FeatureExtractor` interface; torch-fidelity's Inception (local weights only).
- classifier.py: a small CNN classifier as extractor for small data sets (`train_classifier`,
  `class_accuracy`).
- metrics.py / precision_recall.py: the metrics (torchmetrics, synchronised once across ranks).
- reference_stats.py: real-image statistics (ours, ADM reference batches, image folders).
- sampling.py: who samples what, driving a possibly sharded VAR.
- scheduled.py: `ScheduledEvaluator` for the training loop; standalone.py: `var-train eval`.
"""

from .classifier import ClassifierFeatureExtractor, class_accuracy, train_classifier
from .features import (ExtractedFeatures, FeatureExtractor, InceptionFeatureExtractor, MissingInceptionWeightsError,
                       build_feature_extractor)
from .metrics import GenerativeMetrics
from .reference_stats import ReferenceStatistics, load_reference, save_reference_stats
from .scheduled import EvalResult, ScheduledEvaluator

__all__ = [
    "ClassifierFeatureExtractor", "EvalResult", "ExtractedFeatures", "FeatureExtractor", "GenerativeMetrics",
    "InceptionFeatureExtractor", "MissingInceptionWeightsError", "ReferenceStatistics", "ScheduledEvaluator",
    "build_feature_extractor", "class_accuracy", "load_reference", "save_reference_stats", "train_classifier",
]
