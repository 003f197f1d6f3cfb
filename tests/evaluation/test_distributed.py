"""Multi-process evaluation (2 CPU ranks on gloo, started by torchrun once for both checks)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_torchrun
from tests.evaluation.helpers import PooledPixelExtractor, blob_images
from var_train.evaluation.metrics import GenerativeMetrics
from var_train.evaluation.reference_stats import load_reference

HERE = Path(__file__).parent
REAL = (30, 1, 0.4), (20, 2, 0.6)   # (count, seed, brightness) of the parts of each set
FAKE = (25, 3, 0.45), (12, 4, 0.7)


def _images(parts) -> torch.Tensor:
    return torch.cat([blob_images(count, seed=seed, brightness=b) for count, seed, b in parts])


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_eval")
    np.savez(root / "reference.npz", arr_0=_images(REAL).permute(0, 2, 3, 1).numpy())
    np.savez(root / "fake.npz", arr_0=_images(FAKE).permute(0, 2, 3, 1).numpy())
    run_torchrun(HERE / "dist_evaluation.py", root / "reference.npz", root / "fake.npz", root / "out.json",
                 nproc=2, timeout=300)
    return root, json.loads((root / "out.json").read_text())


def test_two_rank_metrics_equal_one_rank(two_ranks):
    root, results = two_ranks
    two = results["uneven"]
    extractor = PooledPixelExtractor()
    reference = load_reference(root / "reference.npz", extractor, need_features=True, progress=False)
    metrics = GenerativeMetrics(extractor, reference, precision_recall=True)
    fake = _images(FAKE)
    metrics.update(fake, torch.arange(len(fake)))
    one = metrics.compute()

    assert two["reference_count"] == reference.count == 50
    np.testing.assert_allclose(two["reference_mu"], reference.mu, rtol=1e-6, atol=1e-9)
    assert set(two["metrics"]) == set(one) == {"fid", "inception_score", "inception_score_std", "precision", "recall"}
    for name, value in one.items():
        assert two["metrics"][name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    assert one["fid"] > 0.01  # the sets differ, so the comparison is not between zeros


def test_scheduled_evaluation_of_fsdp2_sharded_var(two_ranks):
    """Uneven samples over ranks do not hang; padded rows are not scored; the sharded model gives
    exactly the metrics of its unsharded copy."""
    result = two_ranks[1]["fsdp2"]
    sharded, unsharded = result["sharded"], result["unsharded"]
    for name in ("fid", "inception_score", "precision", "recall", "class_accuracy"):
        assert sharded[name] == pytest.approx(unsharded[name], rel=1e-6, abs=1e-9), name
    assert sharded["num_samples"] == 13
    assert sharded["fid"] > 0 and sharded["eval_seconds"] > 0
    hits = sharded["class_accuracy"] * 13  # over the 13 real samples, not the 16 generated rows
    assert hits == pytest.approx(round(hits), abs=1e-9)
    assert result["captions"] == [str(i) for i in range(7)]  # rank 0's samples, captioned by class
