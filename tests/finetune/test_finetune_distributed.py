"""Fine-tuning under 2 CPU processes (gloo): warm start with a new class table, frozen parameters
and an EMA, under fsdp2, deepspeed and ddp; the EMA against a hand computation, and its resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT, run_torchrun
from tests.finetune.shards import make_shards
from tests.models.tiny import tiny_models
from tests.training.learnable_shards import make_tiny_vae
from var_train.checkpoint import complete_checkpoints, consolidated_state_dict, read_metadata
from var_train.config import load_config
from var_train.models.checkpoint_io import save_model
from var_train.parallel.ema import consolidate_ema
from var_train.preemption import EXIT_CODE_PREEMPTED
from var_train.train import build_model_with_report

pytestmark = pytest.mark.distributed

WORKER = REPO_ROOT / "tests" / "finetune" / "finetune_worker.py"
FREEZE = '["blocks.0.*","word_embed.*","pos_*","lvl_embed.*"]'
DECAY = 0.8


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft_dist")
    _, source = tiny_models(seed=3)
    return (save_model(source, root / "ten_class.safetensors"), make_tiny_vae(root / "vae.safetensors"),
            make_shards(root / "shards7", num_classes=7, num_records=64))


def overrides(inputs, run_dir, engine, *extra):
    source, vae, shards = inputs
    return [f"data.train_shards={shards}", f"data.vae={vae}", f"run.output_dir={run_dir}", "data.num_workers=0",
            f"parallel.engine={engine}", "model.num_classes=7", f"model.init_from={source}",
            "model.reinit=[class_emb]", f"optim.freeze={FREEZE}", f"optim.ema_decay={DECAY}",
            "optim.global_batch_size=8", "checkpoint.every_steps=1", "checkpoint.keep_last=10",
            "logging.wandb_mode=disabled", *extra]


def run(inputs, run_dir, engine, *extra, check=True):
    report = run_dir.parent / f"{run_dir.name}.json"
    proc = run_torchrun(WORKER, str(report), *overrides(inputs, run_dir, engine, *extra), check=check)
    return proc, (json.loads(report.read_text()) if report.exists() else None)


@pytest.mark.parametrize("engine", ["fsdp2", "deepspeed", "ddp"])
def test_warm_start_freeze_and_ema_under_two_processes(inputs, tmp_path, engine):
    run_dir = tmp_path / engine
    proc, report = run(inputs, run_dir, engine, "optim.max_steps=3")
    assert report["world_size"] == 2 and report["exit_code"] == 0 and report["step"] == 3
    assert proc.stdout.count("warm start from") == 1 and "null row carried over" in proc.stdout
    frozen = set(report["frozen"])
    assert frozen == {n for n in report["all"] if n.startswith(("blocks.0.", "word_embed.", "pos_", "lvl_embed."))}
    assert set(report["with_state"]) == set(report["all"]) - frozen  # no optimizer state for frozen ones
    assert set(report["with_grad"]) == set(report["all"]) - frozen and report["frozen_grads"] == []
    assert report["ema_updates"] == 3

    # Every checkpoint: frozen tensors bit-identical to the warm start; the rest trained.
    source = load_file(str(inputs[0]))
    checkpoints = complete_checkpoints(run_dir / "checkpoints")
    assert [read_metadata(c)["step"] for c in checkpoints] == [1, 2, 3]
    weights = [consolidated_state_dict(c)[0] for c in checkpoints]
    for state in weights:
        for name in frozen:
            assert torch.equal(state[name], source[name]), name
    assert not torch.equal(weights[-1]["blocks.1.ffn.fc1.weight"], source["blocks.1.ffn.fc1.weight"])

    # EMA by hand: e0 = the warm-started weights, e_k = d e_{k-1} + (1 - d) p_k.
    cfg = load_config(REPO_ROOT / "recipes" / "tiny.yaml", overrides(inputs, run_dir, engine))
    torch.manual_seed(cfg.run.seed)
    start, _ = build_model_with_report(cfg)
    ema = {name: p.detach().clone() for name, p in start.named_parameters()}
    for state in weights:
        for name in ema:
            if name not in frozen:
                ema[name] = DECAY * ema[name] + (1 - DECAY) * state[name]
    saved = consolidate_ema(checkpoints[-1], weights[-1])
    for name, value in ema.items():
        torch.testing.assert_close(saved[name], value, rtol=0, atol=1e-6, msg=name)


def test_ema_resumes_exactly(inputs, tmp_path):
    whole = tmp_path / "whole"
    run(inputs, whole, "fsdp2", "optim.max_steps=4")
    split = tmp_path / "split"
    proc, stopped = run(inputs, split, "fsdp2", "optim.max_steps=4", "run.stop_after_steps=2")
    assert stopped["exit_code"] == EXIT_CODE_PREEMPTED and stopped["step"] == 2
    proc, report = run(inputs, split, "fsdp2", "optim.max_steps=4")
    assert report["world_size"] == 2 and report["step"] == 4 and "resumed from step 2" in proc.stdout
    assert "warm start from" not in proc.stdout  # a resumed run does not warm-start again
    a_dir, b_dir = (complete_checkpoints(d / "checkpoints")[-1] for d in (whole, split))
    a_state, b_state = consolidated_state_dict(a_dir)[0], consolidated_state_dict(b_dir)[0]
    a, b = consolidate_ema(a_dir, a_state), consolidate_ema(b_dir, b_state)
    for name in a:
        assert torch.equal(a[name], b[name]), name
