"""The small digits classifier: trains on the demo data in seconds and measures class accuracy."""

import pytest

from data_prep.cli import main as var_prep
from var_train.evaluation.classifier import (ClassifierFeatureExtractor, class_accuracy, read_image_folder,
                                             train_classifier)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "images"
    assert var_prep(["demo-data", "--out", str(out)]) == 0
    images, labels, class_names = read_image_folder(out)
    summary = train_classifier(out, out.parent / "classifier.safetensors", epochs=3, width=16, progress=False)
    return summary, images, labels, class_names


def test_train_classifier_on_the_digits_and_score_class_accuracy(digits):
    summary, images, labels, class_names = digits
    assert summary.num_train + summary.num_val == 1797 and summary.num_val == 180
    assert summary.val_accuracy > 0.85  # chance is 0.1

    extractor = ClassifierFeatureExtractor.load(summary.path)
    assert class_names == [str(d) for d in range(10)] and images.shape == (1797, 3, 64, 64)
    right = class_accuracy(extractor, images[::5], labels[::5])
    assert right["class_accuracy"] > 0.85
    assert set(right) == {"class_accuracy"} | {f"class_accuracy/{d}" for d in range(10)}
    wrong = class_accuracy(extractor, images[::5], (labels[::5] + 1) % 10)  # every label off by one
    assert wrong["class_accuracy"] < 0.15
    features = extractor(images[:4])
    assert features.features.shape == (4, 128) and features.logits.shape == (4, 10)


def test_class_accuracy_reports_only_the_classes_present(digits):
    summary, images, labels, _ = digits
    extractor = ClassifierFeatureExtractor.load(summary.path)
    picked = labels == 3
    result = class_accuracy(extractor, images[picked][:20].float() / 255, labels[picked][:20])
    assert set(result) == {"class_accuracy", "class_accuracy/3"}
    assert result["class_accuracy"] == result["class_accuracy/3"]
    with pytest.raises(ValueError, match="20 images but 3 labels"):
        class_accuracy(extractor, images[:20], labels[:3])


def test_metrics_on_real_digits_with_the_trained_classifier(digits):
    """Real digits against other real digits score well; a set missing half the classes keeps its
    precision but loses recall and Inception Score; a low-contrast set loses everything."""
    import torch

    from var_train.evaluation.metrics import GenerativeMetrics
    from var_train.evaluation.reference_stats import statistics_from_features

    summary, images, labels, _ = digits
    extractor = ClassifierFeatureExtractor.load(summary.path)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    half_a, half_b = order[:900], order[900:]
    reference = statistics_from_features(extractor(images[half_a]).features, extractor.name, 64)

    def score(candidates):
        metrics = GenerativeMetrics(extractor, reference, precision_recall=True)
        metrics.update(candidates, torch.arange(len(candidates)))
        return metrics.compute()

    real = score(images[half_b])
    first_half = score(images[half_b][labels[half_b] < 5])
    faded = score((images[half_b].float() * 0.5 + 64).to(torch.uint8))
    assert real["fid"] < first_half["fid"] < faded["fid"]
    assert real["precision"] > 0.8 and real["recall"] > 0.8 and real["inception_score"] > 7
    assert first_half["precision"] > 0.8 and first_half["recall"] < 0.6 and first_half["inception_score"] < 5.5
    assert faded["recall"] < 0.1
