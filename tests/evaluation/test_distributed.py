"""Multi-process evaluation (2 CPU ranks on gloo, started by torchrun)."""

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


def _write_adm_npz(path: Path, images: torch.Tensor) -> Path:
    np.savez(path, arr_0=images.permute(0, 2, 3, 1).numpy())
    return path


def test_two_rank_metrics_equal_one_rank(tmp_path):
    real = torch.cat([blob_images(30, seed=1, brightness=0.4), blob_images(20, seed=2, brightness=0.6)])
    fake = torch.cat([blob_images(25, seed=3, brightness=0.45), blob_images(12, seed=4, brightness=0.7)])
    reference_npz = _write_adm_npz(tmp_path / "reference.npz", real)
    fake_npz = _write_adm_npz(tmp_path / "fake.npz", fake)
    out = tmp_path / "two_ranks.json"
    run_torchrun(HERE / "dist_metrics.py", reference_npz, fake_npz, out, nproc=2, timeout=240)
    two = json.loads(out.read_text())

    extractor = PooledPixelExtractor()
    reference = load_reference(reference_npz, extractor, need_features=True, progress=False)
    metrics = GenerativeMetrics(extractor, reference, precision_recall=True)
    metrics.update(fake, torch.arange(len(fake)))
    one = metrics.compute()

    assert two["reference_count"] == len(real) == reference.count
    np.testing.assert_allclose(two["reference_mu"], reference.mu, rtol=1e-6, atol=1e-9)
    assert set(two["metrics"]) == set(one) == {"fid", "inception_score", "inception_score_std", "precision", "recall"}
    for name, value in one.items():
        assert two["metrics"][name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    assert one["fid"] > 0.01  # the sets differ, so the comparison is not between zeros


def test_scheduled_evaluation_of_fsdp2_sharded_var(tmp_path):
    """13 samples in batches of 4 over 2 ranks: rank 0 gets 7 (2 batches, the last padded), rank 1
    gets 6 (2 batches): same call count, nothing hangs, padded rows are not scored, and the
    sharded model gives exactly the metrics of its unsharded copy."""
    out = tmp_path / "fsdp.json"
    run_torchrun(HERE / "dist_scheduled_fsdp.py", out, 13, 4, nproc=2, timeout=300)
    result = json.loads(out.read_text())
    sharded, unsharded = result["sharded"], result["unsharded"]
    for name in ("fid", "inception_score", "precision", "recall", "class_accuracy"):
        assert sharded[name] == pytest.approx(unsharded[name], rel=1e-6, abs=1e-9), name
    assert sharded["num_samples"] == 13
    assert sharded["fid"] > 0 and sharded["eval_seconds"] > 0
    # class_accuracy counts 13 scored samples (padded rows excluded): a multiple of 1/13
    assert round(sharded["class_accuracy"] * 13, 6) == pytest.approx(round(sharded["class_accuracy"] * 13))
    # rank 0's 7 samples go into the grid, captioned with their classes 0..6
    assert result["captions"] == [str(i) for i in range(7)]
