"""Faults in the data path, through `var-prep` and `var-train`: a symlink loop in an ImageFolder,
tiny images, shards from another codebook, a truncated shard, flipped bytes, a full disk."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.data.extract_helpers import random_images, read_records, tiny_vae_checkpoint, write_image_folder
from tests.reliability.helpers import (assert_one_line_error, make_dataset, other_codebook_vae, run_command,
                                       small_filesystem, train_args)
from var_train.data.manifest import read_manifest


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("data_faults")
    vae, _ = tiny_vae_checkpoint(root)
    return root, vae, make_dataset(root, vae)


def _extract(source, vae, out, *extra):
    return run_command("var-prep", "extract", source, "--vae", vae, "--out", out, "--resolution", "64",
                       "--patch-nums", "1,2,3,4", "--shard-size", "4", "--batch-size", "4", "--num-workers", "0",
                       "--no-progress", *extra)


def test_symlink_loop_gives_each_image_once_with_its_class(world, tmp_path):
    root, vae, _ = world
    images = tmp_path / "images"
    write_image_folder(images, random_images(5, 64, 64, seed=9), [0, 0, 1, 1, 1])
    os.symlink("..", images / "class0" / "uplink")                    # a/uplink -> ..  (the loop)
    os.symlink("../class1", images / "class0" / "alias")              # the same real folder twice
    os.symlink("img000.png", images / "class0" / "same.png")          # the same real file twice
    proc = _extract(images, vae, tmp_path / "tokens")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = read_records(tmp_path / "tokens")
    by_name = {r.key.split("_", 1)[1]: r.label for r in records}
    # Written out by hand: 5 files on disk, 2 in class0 and 3 in class1, each once with its own class.
    assert sorted(by_name.items()) == [("class0_img000", 0), ("class0_img001", 0), ("class1_img002", 1),
                                      ("class1_img003", 1), ("class1_img004", 1)]
    report = json.loads((tmp_path / "tokens" / "report.json").read_text())
    reasons = {os.path.basename(s["source"]): s["reason"] for s in report["skipped"]}
    assert reasons["uplink"].startswith("symlink loop") and reasons["alias"].startswith("duplicate folder")
    assert reasons["same.png"].startswith("duplicate file")


def test_small_images_are_kept_by_default_and_filtered_only_when_asked(world, tmp_path):
    _, vae, _ = world
    images = tmp_path / "images"
    write_image_folder(images, random_images(2, 64, 64, seed=1), [0, 1])
    Image.fromarray(np.full((30, 40, 3), 200, np.uint8)).save(images / "class0" / "small.png")  # 40x30
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(images / "class1" / "tiny.png")    # 16x16
    proc = _extract(images, vae, tmp_path / "kept")
    assert proc.returncode == 0, proc.stderr
    assert read_manifest(tmp_path / "kept").num_records == 4
    proc = _extract(images, vae, tmp_path / "filtered", "--min-size", "32")
    assert proc.returncode == 0, proc.stderr
    manifest = read_manifest(tmp_path / "filtered")
    assert manifest.num_records == 2 and manifest.skipped == {"too small": 2}


def test_shards_of_another_codebook_are_refused_a_resaved_copy_is_not(world, tmp_path):
    root, vae, shards = world
    other = other_codebook_vae(tmp_path)
    proc = run_command("var-train", *train_args(shards, other, tmp_path / "run", "optim.max_steps=1"))
    assert_one_line_error(proc, "has another codebook than the VAE the shards", "data.allow_vae_mismatch=true")
    assert not (tmp_path / "run").exists()

    from var_train.models.checkpoint_io import load_vae, save_model
    copy = save_model(load_vae(vae, patch_nums=(1, 2, 3, 4)), tmp_path / "copy.safetensors")  # another format
    proc = run_command("var-train", *train_args(shards, copy, tmp_path / "copy_run", "optim.max_steps=1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr

    proc = run_command("var-train", *train_args(shards, other, tmp_path / "forced", "optim.max_steps=1",
                                                "data.allow_vae_mismatch=true"))
    assert proc.returncode == 0 and "has another codebook" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_truncated_shard_fails_at_start_and_verify_finds_flipped_bytes(world, tmp_path):
    _, vae, shards = world
    copy = tmp_path / "tokens"
    shutil.copytree(shards, copy)
    assert run_command("var-prep", "verify", copy).returncode == 0
    manifest = read_manifest(copy)
    assert all(s.num_bytes > 0 and len(s.sha256) == 64 for s in manifest.shards)

    last = copy / manifest.shards[-1].name
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF                                     # same size, other content
    last.write_bytes(bytes(data))
    proc = run_command("var-prep", "verify", copy)
    assert_one_line_error(proc, "1 of 4 shard(s)")
    assert f"bad shard: {last.name}: sha256" in proc.stdout

    last.write_bytes(bytes(data[:len(data) // 2]))                    # truncated
    proc = run_command("var-train", *train_args(copy, vae, tmp_path / "run", "optim.max_steps=100"))
    assert_one_line_error(proc, f"{last.name} ({len(data) // 2} bytes, manifest {len(data)})")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_extraction_on_a_full_disk_says_so_and_resumes(world, tmp_path):
    _, vae, _ = world
    images = tmp_path / "images"
    write_image_folder(images, random_images(12, 64, 64, seed=4), [i % 2 for i in range(12)])
    with small_filesystem(tmp_path / "disk", "64k") as disk:
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (64 * 1024 - 16 * 1024))             # leaves ~16 KiB: room for a shard or two
        proc = _extract(images, vae, disk / "tokens")
        line = assert_one_line_error(proc, "no space left on device at", "needed ~", "free ")
        assert "write to closed file" not in proc.stderr
        leftovers = [p.name for p in (disk / "tokens").iterdir() if "tmp" in p.name]
        assert leftovers == [], leftovers
        filler.unlink()                                                 # the user frees space and reruns
        proc = _extract(images, vae, disk / "tokens")
        assert proc.returncode == 0, proc.stdout + proc.stderr + line
        assert read_manifest(disk / "tokens").num_records == 12
        assert run_command("var-prep", "verify", disk / "tokens").returncode == 0
