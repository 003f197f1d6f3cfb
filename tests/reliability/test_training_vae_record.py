"""A trained VAR remembers its VAE: checkpoints and exported .safetensors record the training VAE's
codebook, and `var-train sample` / `edit` / `eval` refuse a VAE with the same shapes but another codebook
(one line naming `--allow-vae-mismatch`); a reference-layout .pth records nothing and is not checked."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from safetensors import safe_open

from tests.data.extract_helpers import tiny_vae_checkpoint
from tests.reliability.helpers import (assert_one_line_error, make_dataset, other_codebook_vae, run_command,
                                       train_args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("training_vae")
    vae, _ = tiny_vae_checkpoint(root)
    shards = make_dataset(root, vae)
    run_dir = root / "run"
    proc = run_command("var-train", *train_args(shards, vae, run_dir, "optim.max_steps=1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root, vae, run_dir, other_codebook_vae(root / "other")


def _sample(var, vae, out, *extra):
    return run_command("var-train", "sample", "--var", var, "--vae", vae, "--classes", "0", "--per-class", "1",
                       "--device", "cpu", "--out", out, *extra, timeout=300)


def test_checkpoint_and_export_record_the_vae_and_sample_checks_it(trained, tmp_path):
    root, vae, run_dir, other = trained
    (checkpoint,) = sorted((run_dir / "checkpoints").glob("step-*"))
    recorded = json.loads((checkpoint / "metadata.json").read_text())["training_vae"]
    # The file hash (computed anyway against the shards' manifest) is the file's own sha256.
    assert recorded["sha256"] == hashlib.sha256(vae.read_bytes()).hexdigest()
    fingerprint = recorded["codebook_sha256"]
    assert len(fingerprint) == 64 and recorded["path"] == str(vae)

    exported = tmp_path / "var.safetensors"
    proc = run_command("var-train", "export", run_dir, "--out", exported)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with safe_open(str(exported), framework="pt") as f:
        assert json.loads(f.metadata()["var_train_training_vae"]) == recorded

    proc = _sample(exported, vae, tmp_path / "same")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert any((tmp_path / "same").rglob("*.png"))

    proc = _sample(exported, other, tmp_path / "other")
    assert_one_line_error(proc, "has another codebook", "the VAR was trained with", str(vae), fingerprint[:12],
                          "--allow-vae-mismatch")
    assert not (tmp_path / "other").exists()
    image = next((root / "images").rglob("*.png"))
    proc = run_command("var-train", "edit", "--var", exported, "--vae", other, "--image", image, "--box", "0,0,32,32",
                       "--device", "cpu", "--out", tmp_path / "edit.png", timeout=300)
    assert_one_line_error(proc, "has another codebook", fingerprint[:12], "--allow-vae-mismatch")
    assert not (tmp_path / "edit.png").exists()

    proc = _sample(exported, other, tmp_path / "forced", "--allow-vae-mismatch")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "has another codebook" in proc.stdout + proc.stderr
    assert any((tmp_path / "forced").rglob("*.png"))

    # The reference layout has no metadata: nothing recorded, nothing to compare (shapes still are).
    reference_layout = tmp_path / "var.pth"
    proc = run_command("var-train", "export", run_dir, "--out", reference_layout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = _sample(reference_layout, other, tmp_path / "pth")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_eval_of_a_run_directory_refuses_another_codebook(trained, tmp_path):
    _, vae, run_dir, other = trained
    proc = run_command("var-train", "eval", "--var", run_dir, "--vae", other, "--num-samples", "2",
                       "--device", "cpu", "--out", tmp_path / "eval", "--quiet", timeout=300)
    assert_one_line_error(proc, "has another codebook", str(vae), "--allow-vae-mismatch")
    assert not (tmp_path / "eval" / "samples").exists()


def test_resume_with_shards_and_vae_of_another_codebook_is_refused(trained, tmp_path):
    root, vae, run_dir, other = trained
    run_copy = tmp_path / "run"
    shutil.copytree(run_dir, run_copy)
    before = {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file()}
    other_shards = make_dataset(root, other, name="other_tokens")  # consistent with `other`: only the run differs
    proc = run_command("var-train", *train_args(other_shards, other, run_copy, "optim.max_steps=2"))
    assert_one_line_error(proc, "cannot resume", "has another codebook", str(vae), "data.allow_vae_mismatch=true")
    assert {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file()} == before

    proc = run_command("var-train", *train_args(other_shards, other, run_copy, "optim.max_steps=2",
                                                "data.allow_vae_mismatch=true"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "has another codebook" in proc.stdout + proc.stderr
    assert (run_copy / "checkpoints" / "step-00000002" / "metadata.json").is_file()
