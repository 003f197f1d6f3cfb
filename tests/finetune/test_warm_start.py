"""Warm start with another class set or scale schedule (model.init_from + model.reinit)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.finetune.shards import make_shards
from tests.models.tiny import tiny_models
from tests.training.learnable_shards import make_tiny_vae
from var_train.config import ConfigError, load_config
from var_train.errors import MismatchError
from var_train.models import VAR
from var_train.models.adapt import warm_start
from var_train.models.checkpoint_io import save_model, save_reference_layout
from var_train.train import build_model_with_report


def _config(*overrides):
    return load_config(REPO_ROOT / "recipes" / "tiny.yaml", list(overrides))


def _build(cfg):
    torch.manual_seed(cfg.run.seed)  # as the Trainer does before building
    return build_model_with_report(cfg)


@pytest.fixture(scope="module")
def ten_class(tmp_path_factory):
    """A 10-class tiny VAR on (1, 2, 3, 4) with non-initial weights, as safetensors and as .pth."""
    root = tmp_path_factory.mktemp("ten_class")
    _, var = tiny_models(seed=3)
    with torch.no_grad():
        for p in var.parameters():  # move every tensor away from any initialisation
            p.add_(torch.randn_like(p) * 0.05)
    return var, save_model(var, root / "var.safetensors"), save_reference_layout(var, root / "var.pth")


def _names(report):
    lists = (report.loaded, report.reinitialised, report.adapted, report.rebuilt)
    return [entry.split(" (")[0] for names in lists for entry in names]


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_new_class_count_keeps_every_other_tensor_and_the_null_row(ten_class, fmt):
    source, safetensors_path, pth_path = ten_class
    path = safetensors_path if fmt == "safetensors" else pth_path
    model, report = _build(_config("model.num_classes=7", f"model.init_from={path}", "model.reinit=[class_emb]"))
    fresh, _ = _build(_config("model.num_classes=7"))
    old = source.state_dict()
    for name, tensor in model.state_dict().items():
        if name != "class_emb.weight":
            assert torch.equal(tensor, old[name]), name
    table = model.class_emb.weight
    assert table.shape == (8, 64)
    assert torch.equal(table[-1], old["class_emb.weight"][-1])  # null row carried over
    assert torch.equal(table[:7], fresh.class_emb.weight[:7])  # new rows: the reference init
    assert not torch.equal(table[:7], old["class_emb.weight"][:7])
    names = _names(report)
    assert sorted(names) == sorted(model.state_dict())  # every tensor listed, once
    assert "class_emb.weight" in [e.split(" (")[0] for e in report.adapted]
    assert "null row carried over" in report.describe()


def test_class_init_mean_starts_new_rows_near_the_old_mean(ten_class):
    source, path, _ = ten_class
    model, _ = _build(_config("model.num_classes=5", f"model.init_from={path}", "model.reinit=[class_emb]",
                              "model.class_init=mean"))
    old_rows = source.class_emb.weight[:10].detach()
    rows = model.class_emb.weight[:5].detach()
    spread = old_rows.std(dim=0, unbiased=False)
    assert torch.equal(model.class_emb.weight[-1], source.class_emb.weight[-1])
    assert ((rows - old_rows.mean(0)).abs() <= 0.5 * spread + 1e-6).all()  # noise is 0.1 x spread
    assert not torch.equal(rows[0], rows[1])


def test_class_count_change_refused_without_opt_in_with_one_line_hint(ten_class):
    _, path, _ = ten_class
    with pytest.raises(MismatchError) as error:
        _build(_config("model.num_classes=7", f"model.init_from={path}"))
    assert "model.reinit=[class_emb]" in str(error.value) and "\n" not in str(error.value)
    # Another mismatch (the width) names the tensors and the way out, and loads nothing.
    with pytest.raises(MismatchError, match="word_embed.weight.*model.reinit"):
        warm_start(VAR(vocab_size=64, z_channels=4, num_classes=10, depth=2, embed_dim=64, num_heads=2,
                       patch_nums=(1, 2, 3, 4)), ten_class[0].state_dict())


def test_config_checks():
    with pytest.raises(ConfigError, match="model.reinit.*needs model.init_from"):
        _config("model.reinit=[class_emb]")
    with pytest.raises(ConfigError, match="model.class_init"):
        _config("model.class_init=median")
    with pytest.raises(ConfigError, match="optim.ema_decay"):
        _config("optim.ema_decay=1.5")


def test_new_schedule_gives_the_same_logits_on_the_common_scales(ten_class):
    source, path, _ = ten_class
    source.eval()
    model, report = _build(_config("model.patch_nums=[1,2,3,4,6]", f"model.init_from={path}",
                                   "model.label_dropout=0.0"))
    model.eval()
    adapted = {e.split(" (")[0] for e in report.adapted}
    assert adapted == {"pos_1LC", "lvl_embed.weight"} and set(report.rebuilt) == {"lvl_1L", "attn_bias_for_masking"}
    # The common scales' positions and levels are the checkpoint's own grid, unchanged.
    assert torch.equal(model.pos_1LC[:, :30], source.pos_1LC)
    assert torch.equal(model.lvl_embed.weight[:4], source.lvl_embed.weight)
    assert torch.equal(model.lvl_embed.weight[4], source.lvl_embed.weight[3])
    torch.manual_seed(0)
    labels = torch.tensor([0, 3, 9])
    teacher = torch.randn(3, 29, 8)
    extra = torch.randn(3, 36, 8)  # the new 6x6 scale's input: invisible to the earlier scales
    with torch.no_grad():
        before = source(labels, teacher)
        after = model(labels, torch.cat([teacher, extra], dim=1))
    assert after.shape == (3, 30 + 36, 64)
    torch.testing.assert_close(after[:, :30], before, rtol=1e-5, atol=1e-5)


# -- real training runs, one process --------------------------------------------------------------
def _train(run_dir, shards, vae, *overrides, check=True):
    args = [sys.executable, "-m", "var_train.cli", "train", "--recipe", "recipes/tiny.yaml",
            f"data.train_shards={shards}", f"data.vae={vae}", f"run.output_dir={run_dir}", "data.num_workers=0",
            "optim.global_batch_size=4", "checkpoint.every_steps=1000", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["train/loss"] for row in rows if "train/loss" in row]


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    """A 10-class run of the tiny recipe (fsdp2, one process): its directory is an init_from source."""
    root = tmp_path_factory.mktemp("pretrained")
    vae = make_tiny_vae(root / "vae.safetensors")
    shards = make_shards(root / "shards10", num_classes=10)
    _train(root / "run", shards, vae, "optim.max_steps=3")
    return root / "run", vae, root


def test_run_directory_to_seven_classes_trains(pretrained_run):
    run, vae, root = pretrained_run
    shards = make_shards(root / "shards7", num_classes=7, seed=1)
    refused = _train(root / "refused", shards, vae, "model.num_classes=7", f"model.init_from={run}",
                     "optim.max_steps=2", check=False)
    assert refused.returncode == 2, refused.stderr[-2000:]
    error_lines = [line for line in refused.stderr.splitlines() if line.startswith("error")]
    assert len(error_lines) == 1 and "model.reinit=[class_emb]" in error_lines[0], refused.stderr[-2000:]

    proc = _train(root / "ft7", shards, vae, "model.num_classes=7", f"model.init_from={run}",
                  "model.reinit=[class_emb]", "optim.max_steps=4", "optim.ema_decay=0.5")
    assert proc.stdout.count("warm start from") == 1 and "null row carried over" in proc.stdout
    losses = _losses(root / "ft7")
    assert len(losses) == 4 and all(l == l and l < 1e3 for l in losses)

    # `var-train export --ema` writes the EMA weights, a plain export the training weights.
    from var_train.cli import main
    from var_train.models.checkpoint_io import load_var

    assert main(["export", str(root / "ft7"), "--ema", "--out", str(root / "ema.safetensors")]) == 0
    assert main(["export", str(root / "ft7"), "--out", str(root / "last.safetensors")]) == 0
    ema, last = load_var(root / "ema.safetensors"), load_var(root / "last.safetensors")
    assert ema.num_classes == 7 and not torch.equal(ema.head.weight, last.head.weight)


def test_new_schedule_trains_with_the_same_vae(pretrained_run):
    run, vae, root = pretrained_run  # the VAE was saved with (1, 2, 3, 4); it serves (1, 2, 3, 4, 6) too
    shards = make_shards(root / "shards_96px", num_classes=10, patch_nums=(1, 2, 3, 4, 6))
    proc = _train(root / "ft96", shards, vae, "model.patch_nums=[1,2,3,4,6]", f"model.init_from={run}",
                  "optim.max_steps=4")
    assert "pos_1LC (resampled (1, 2, 3, 4) -> (1, 2, 3, 4, 6)" in proc.stdout
    losses = _losses(root / "ft96")
    assert len(losses) == 4 and all(l == l for l in losses)
