"""FID, IS and precision/recall behave as their definitions say (single process)."""

import numpy as np
import pytest
import scipy.linalg
import torch

from tests.evaluation.helpers import PooledPixelExtractor, blob_images
from var_train.evaluation.features import ExtractedFeatures
from var_train.evaluation.metrics import GenerativeMetrics
from var_train.evaluation.precision_recall import improved_precision_recall, kth_neighbour_radii
from var_train.evaluation.reference_stats import statistics_from_features


def _score(extractor, reference, images, **kwargs) -> dict:
    metrics = GenerativeMetrics(extractor, reference, **kwargs)
    metrics.update(images, torch.arange(len(images)))
    return metrics.compute()


def _reference(extractor, images):
    return statistics_from_features(extractor(images).features, extractor.name, images.shape[-1])


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_the_shift():
    extractor = PooledPixelExtractor()
    real = blob_images(200, seed=0, brightness=0.4)
    reference = _reference(extractor, real)
    assert _score(extractor, reference, real)["fid"] == pytest.approx(0.0, abs=1e-6)
    fids = [_score(extractor, reference, blob_images(200, seed=1, brightness=0.4 + shift))["fid"]
            for shift in (0.0, 0.05, 0.1, 0.2, 0.3)]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    assert fids[0] < 0.1 * fids[-1]  # another draw of the same distribution is close (finite-sample bias only)


def test_fid_matches_the_closed_form_computed_independently():
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), with scipy's sqrtm as ADM's evaluator does."""
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(500, 6, generator=generator, dtype=torch.float64)
    fake = torch.randn(300, 6, generator=generator, dtype=torch.float64) @ torch.diag(torch.tensor(
        [1.0, 2.0, 0.5, 1.0, 1.5, 1.0], dtype=torch.float64)) + 0.3

    class Fixed(PooledPixelExtractor):
        num_features = 6

    reference = statistics_from_features(real, Fixed.name, None)
    metrics = GenerativeMetrics(Fixed(), reference, inception_score=False)
    metrics.update_features(ExtractedFeatures(fake), torch.arange(len(fake)))
    mu1, mu2 = reference.mu, fake.numpy().mean(0)
    s1, s2 = reference.sigma, np.cov(fake.numpy(), rowvar=False)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert metrics.compute()["fid"] == pytest.approx(expected, rel=1e-8)


@pytest.mark.filterwarnings("ignore:std.*degrees of freedom:UserWarning")  # one split has no spread
def test_inception_score_of_confident_diverse_logits_beats_a_collapsed_set():
    extractor = PooledPixelExtractor(num_logits=10)
    n = 200
    labels = torch.arange(n) % 10
    confident_diverse = torch.nn.functional.one_hot(labels, 10).double() * 20
    collapsed = torch.nn.functional.one_hot(torch.zeros(n, dtype=torch.long), 10).double() * 20
    uncertain = torch.zeros(n, 10, dtype=torch.float64)
    scores = {}
    for splits in (1, 10):
        for name, logits in (("diverse", confident_diverse), ("collapsed", collapsed), ("uncertain", uncertain)):
            metrics = GenerativeMetrics(extractor, None, splits=splits)
            metrics.update_features(ExtractedFeatures(torch.zeros(n, 48), logits), torch.arange(n))
            scores[name, splits] = metrics.compute()["inception_score"]
    assert scores["diverse", 1] == pytest.approx(10.0, rel=1e-6)  # exp(H(y)): 10 classes used equally
    assert scores["diverse", 10] > 5.0  # 10 random parts of 20 samples each see fewer classes each
    for splits in (1, 10):
        assert scores["collapsed", splits] == pytest.approx(1.0, abs=1e-6)
        assert scores["uncertain", splits] == pytest.approx(1.0, abs=1e-6)


def test_inception_score_does_not_depend_on_update_order():
    extractor = PooledPixelExtractor()
    images = torch.cat([blob_images(40, seed=2, brightness=0.3), blob_images(40, seed=3, brightness=0.7)])
    in_order = _score(extractor, None, images)
    metrics = GenerativeMetrics(extractor, None)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(9))
    for chunk in order.split(13):
        metrics.update(images[chunk], chunk)
    global_rng = torch.random.get_rng_state()
    # equal up to float32 rounding of the batched features (a different split would move it by %)
    assert metrics.compute()["inception_score"] == pytest.approx(in_order["inception_score"], rel=1e-6)
    assert torch.equal(torch.random.get_rng_state(), global_rng)  # a training run's RNG is left alone


def test_precision_recall_identical_sets_and_far_apart_sets():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(300, 8, generator=generator)
    assert improved_precision_recall(real, real.clone()) == (1.0, 1.0)
    precision, recall = improved_precision_recall(real, torch.randn(300, 8, generator=generator) + 100.0)
    assert precision == 0.0 and recall == 0.0


def test_precision_recall_separate_fidelity_from_coverage():
    """Samples covering only one of the real modes: precise (they look real) but low recall."""
    generator = torch.Generator().manual_seed(1)
    mode_a = torch.randn(200, 4, generator=generator)
    mode_b = torch.randn(200, 4, generator=generator) + 20
    fake_only_a = torch.randn(200, 4, generator=generator)
    precision, recall = improved_precision_recall(torch.cat([mode_a, mode_b]), fake_only_a)
    assert precision > 0.9
    assert 0.35 < recall < 0.6


def test_kth_neighbour_radius_excludes_the_point_itself():
    points = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    # neighbours of 0: 1, 3, 6 -> 3rd nearest at distance 6
    assert kth_neighbour_radii(points, k=3)[0].item() == pytest.approx(6.0)
    assert kth_neighbour_radii(points, k=1).tolist() == pytest.approx([1.0, 1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="need more than 3 points"):
        kth_neighbour_radii(points[:3], k=3)


def test_metrics_refuse_reference_from_another_extractor_and_missing_features():
    extractor = PooledPixelExtractor()
    other = statistics_from_features(torch.randn(10, 48), "another-network", 16)
    with pytest.raises(ValueError, match="another-network"):
        GenerativeMetrics(extractor, other)
    no_features = statistics_from_features(torch.randn(10, 48), extractor.name, 16, keep_features=False)
    with pytest.raises(ValueError, match="per-image reference features"):
        GenerativeMetrics(extractor, no_features, precision_recall=True)


def test_class_accuracy_is_one_metric_with_the_common_protocol():
    """Hand-counted: class 0 has 2 of 3 right, class 2 has 1 of 1, class 1 no samples."""
    from var_train.evaluation.metrics import ClassAccuracy

    logits = torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 2]), 3).float()  # predictions 0, 0, 1, 2
    labels = torch.tensor([0, 0, 0, 2])
    metric = ClassAccuracy(3, class_names=["zero", "one", "two"], per_class=True)
    metric.update(ExtractedFeatures(torch.zeros(2, 1), logits[:2]), torch.arange(2), labels[:2])
    metric.update(ExtractedFeatures(torch.zeros(2, 1), logits[2:]), torch.arange(2, 4), labels[2:])
    assert metric.compute() == {"class_accuracy": 0.75, "class_accuracy/zero": pytest.approx(2 / 3),
                                "class_accuracy/two": 1.0}
    metric.reset()
    metric.update(ExtractedFeatures(torch.zeros(1, 1), logits[2:3]), torch.arange(1), torch.tensor([1]))
    assert metric.compute()["class_accuracy"] == 1.0
    # inside GenerativeMetrics it is switched on by an extractor that classifies the model's classes
    extractor = PooledPixelExtractor(num_logits=10)
    assert "class_accuracy" in GenerativeMetrics(extractor, None, num_classes=10).metric_names
    assert "class_accuracy" not in GenerativeMetrics(extractor, None, num_classes=1000).metric_names
