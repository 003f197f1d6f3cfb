"""`var-train demo` end to end with small budgets: every stage runs and the summary is written."""

import json

from var_train.cli.demo_pipeline import DemoConfig, run_demo


def test_demo_pipeline_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    summary = run_demo(DemoConfig(out=str(out), tokenizer_minutes=0.1, samples_per_class=2,
                                  train_overrides=["optim.max_steps=3", "logging.log_every=1",
                                                   "logging.wandb_mode=disabled"]))
    assert set(summary["stage_seconds"]) == {"demo data", "tokenizer", "token shards", "VAR training", "samples",
                                             "digits classifier", "evaluation"}
    for name in ("fid", "inception_score", "precision", "recall", "class_accuracy"):
        assert name in summary["metrics"]
    assert len(summary["class_accuracy_per_class"]) == 10
    assert (out / "samples" / "grid.png").is_file() and (out / "var.safetensors").is_file()
    assert json.loads((out / "summary.json").read_text()) == summary
    rows = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "train/loss" in row] == [1, 2, 3]
