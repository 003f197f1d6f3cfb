"""Scheduled evaluation inside a tiny 2-process training run (FSDP2, gloo): metrics are logged."""

import json

import pytest

from tests.conftest import run_torchrun
from tests.evaluation.helpers import seeded_classifier
from tests.training.learnable_shards import make_learnable_shards, make_tiny_vae
from var_train.evaluation.reference_stats import compute_fid_stats
from var_train.evaluation.standalone import EvalSettings, evaluate_checkpoint
from var_train.models import SamplingSettings


def test_two_rank_training_logs_scheduled_evaluation(tmp_path):
    shards = make_learnable_shards(tmp_path / "shards", num_records=64)
    vae = make_tiny_vae(tmp_path / "vae.safetensors")
    classifier = seeded_classifier(6).save(tmp_path / "classifier.safetensors")
    # real statistics: the shards' images decoded by the VQVAE, scored by the classifier
    compute_fid_stats(out=tmp_path / "stats.npz", shards=shards, vae=vae, feature_extractor=str(classifier),
                      batch_size=32, progress=False)
    run_dir = tmp_path / "run"
    proc = run_torchrun("-m", "var_train.cli", "train", "--recipe", "recipes/tiny.yaml",
                        f"data.train_shards={shards}", f"data.vae={vae}", f"run.output_dir={run_dir}",
                        "optim.max_steps=4", "checkpoint.every_steps=0", "eval.every_steps=2", "eval.at_end=true",
                        "eval.num_samples=11", "eval.batch_size=4", "eval.top_k=0", "eval.top_p=0.0",
                        f"eval.feature_extractor={classifier}", f"eval.reference_stats={tmp_path / 'stats.npz'}",
                        "eval.precision_recall=true", nproc=2, timeout=400)
    assert "on 2 x cpu" in proc.stdout, proc.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {row["step"]: row for row in rows if "eval/fid" in row}
    assert sorted(evals) == [2, 4]  # every 2 steps; the last step is evaluated once, not twice
    for row in evals.values():
        for name in ("eval/fid", "eval/inception_score", "eval/precision", "eval/recall", "eval/class_accuracy",
                     "eval/eval_seconds", "eval/share_of_train_time"):
            assert isinstance(row[name], float) and row[name] == row[name], (name, row)  # present, not NaN
        assert row["eval/num_samples"] == 11 and row["eval/eval_seconds"] > 0
        assert 0 <= row["eval/precision"] <= 1 and 0 <= row["eval/recall"] <= 1
    assert evals[2]["eval/fid"] != pytest.approx(evals[4]["eval/fid"])  # the model moved between evaluations

    # `var-train eval` takes the run directory itself (its newest checkpoint, consolidated)
    report = evaluate_checkpoint(run_dir, vae, tmp_path / "eval", tmp_path / "stats.npz",
                                 EvalSettings(SamplingSettings(top_k=0, top_p=0.0), per_class=1, batch_size=5,
                                              feature_extractor=str(classifier)), device="cpu", progress=False)
    assert report["num_samples"] == 10 and report["generated_now"] == 10
    assert 0 <= report["precision"] <= 1 and report["fid"] == report["fid"]

    # so do `var-train sample` and `edit`: the same images as from the exported weights
    from var_train.checkpoint import export_checkpoint
    from var_train.cli import main

    exported = export_checkpoint(run_dir, tmp_path / "var.safetensors")
    for var, out in ((run_dir, tmp_path / "from_run"), (exported, tmp_path / "from_export")):
        assert main(["sample", "--var", str(var), "--vae", str(vae), "--classes", "0-2", "--per-class", "2",
                     "--seed", "3", "--out", str(out), "--device", "cpu"]) == 0
    pngs = sorted(p.relative_to(tmp_path / "from_run") for p in (tmp_path / "from_run").rglob("*.png"))
    assert len(pngs) >= 6
    assert all((tmp_path / "from_run" / p).read_bytes() == (tmp_path / "from_export" / p).read_bytes() for p in pngs)
