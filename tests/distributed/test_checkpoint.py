"""Checkpoints: exact resume for every engine, resharding 2 -> 1 rank, atomicity, retention,
asynchronous saves (2 CPU ranks over gloo) and export to safetensors / reference .pth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_torchrun
from var_train.checkpoint import (export_checkpoint, is_complete, resolve_checkpoint, rng_state,
                                  set_rng_state)
from var_train.models.checkpoint_io import load_var

WORKER = Path(__file__).with_name("checkpoint_worker.py")
ENGINES = ("fsdp2", "ddp", "deepspeed")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Checkpoints of every engine written by 2 ranks, and the worker's output."""
    out = tmp_path_factory.mktemp("checkpoints")
    proc = run_torchrun(WORKER, "save-resume", str(out), nproc=2, timeout=300)
    return out, proc.stdout


@pytest.mark.distributed
@pytest.mark.parametrize("engine", ENGINES)
def test_resume_restores_everything_and_continues_exactly(saved, engine):
    _, output = saved
    assert f"OK {engine}: resume restores parameters, optimizer, RNG; continued training matches" in output, output


@pytest.mark.distributed
def test_interrupted_save_retention_and_async(saved):
    out, output = saved
    assert "OK an interrupted save is ignored by load_latest" in output, output
    assert "OK keep_last=2 keeps ['step-00000011', 'step-00000012']; async save holds the state at save time" in output
    leftover = out / "fsdp2" / "checkpoints" / ".tmp-step-00000099"  # what a crashed save leaves
    leftover.mkdir(exist_ok=True)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(leftover)


@pytest.mark.distributed
def test_two_rank_fsdp2_checkpoint_loads_on_one_rank(saved):
    out, _ = saved
    output = run_torchrun(WORKER, "reshard", str(out), nproc=1, timeout=180).stdout
    assert "OK a 2-rank fsdp2 checkpoint loads on 1 rank with identical parameters" in output, output


@pytest.mark.distributed
def test_checkpoint_layout_and_metadata(saved):
    out, _ = saved
    step_dir = resolve_checkpoint(out / "fsdp2")
    assert step_dir.name == "step-00000002" and is_complete(step_dir)
    metadata = json.loads((step_dir / "metadata.json").read_text())
    assert metadata["step"] == 2 and metadata["engine"] == "fsdp2" and metadata["world_size"] == 2
    assert metadata["model_config"]["depth"] == 2
    assert sorted(p.name for p in (step_dir / "rng").iterdir()) == ["rank-00000.pt", "rank-00001.pt"]
    assert torch.load(step_dir / "trainer_state.pt", weights_only=True)["wandb_run_id"] == "abc123"


@pytest.mark.distributed
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("suffix", (".safetensors", ".pth"))
def test_export_loads_back_strictly(saved, tmp_path, engine, suffix):
    out, _ = saved
    expected = torch.load(out / f"expected-{engine}.pt", weights_only=True)
    path = export_checkpoint(out / engine, tmp_path / f"var{suffix}")
    model = load_var(path)  # strict: every key and shape must match
    state = model.state_dict()
    assert set(state) == set(expected)
    for key in ("lvl_1L", "attn_bias_for_masking", "blocks.0.attn.zero_k_bias"):
        assert key in state
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    if suffix == ".pth":  # the reference layout: a plain state dict of tensors
        raw = torch.load(path, weights_only=True)
        assert isinstance(raw, dict) and set(raw) == set(expected)


@pytest.mark.distributed
def test_export_cli(saved, tmp_path, capsys):
    from var_train.cli import main

    out, _ = saved
    assert main(["export", str(out / "ddp"), "--out", str(tmp_path / "w.pth")]) == 0
    assert (tmp_path / "w.pth").is_file() and "step 2, ddp" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x.pth")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert main(["export", str(out / "ddp"), "--out", str(tmp_path / "x.bin")]) == 2


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = rng_state()
    first = (torch.rand(4), random.random(), np.random.rand(3))
    set_rng_state(state)
    again = (torch.rand(4), random.random(), np.random.rand(3))
    assert torch.equal(first[0], again[0]) and first[1] == again[1] and np.array_equal(first[2], again[2])
