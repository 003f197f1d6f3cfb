"""Evaluation of generated images: FID, Inception Score, improved precision/recall, class accuracy.

- features.py: the `FeatureExtractor` interface and the registry `build_feature_extractor` reads;
  inception.py (torch-fidelity's Inception, local weights only) and classifier.py (a small CNN
  for small data sets: `train_classifier`, `class_accuracy`) register themselves, imported here.
- metrics.py / precision_recall.py: the metrics behind one protocol (update/compute/reset),
  synchronised once across ranks; `GenerativeMetrics` feeds them from one feature extraction.
- reference_stats.py: real-image statistics (ours, ADM reference batches, image folders).
- sampling.py: which rank makes which sample (the images come from `var_train.models.generate_batch`).
- scheduled.py: `ScheduledEvaluator` for the training loop; standalone.py: `var-train eval`.
"""

from .classifier import ClassifierFeatureExtractor, class_accuracy, train_classifier
from .features import ExtractedFeatures, FeatureExtractor, build_feature_extractor, register_extractor
from .inception import InceptionFeatureExtractor, MissingInceptionWeightsError
from .metrics import ClassAccuracy, GenerativeMetrics, SampleMetric
from .reference_stats import ReferenceStatistics, load_reference, save_reference_stats
from .scheduled import EvalResult, ScheduledEvaluator

__all__ = [
    "ClassAccuracy", "ClassifierFeatureExtractor", "EvalResult", "ExtractedFeatures", "FeatureExtractor",
    "GenerativeMetrics", "InceptionFeatureExtractor", "MissingInceptionWeightsError", "ReferenceStatistics",
    "SampleMetric", "ScheduledEvaluator", "build_feature_extractor", "class_accuracy", "load_reference",
    "register_extractor", "save_reference_stats", "train_classifier",
]
