"""`var-prep extract` resumes by what the input is, not how its path was typed, and a failed start
leaves nothing that blocks the next one."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import webdataset as wds

from data_prep.cli import main
from tests.conftest import REPO_ROOT
from tests.data.extract_helpers import random_images, run_extract, tiny_vae_checkpoint, write_image_folder
from var_train.errors import MismatchError

LABELS = [0, 1, 0, 1, 0, 1, 0]


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "data" / "images"
    write_image_folder(root, random_images(len(LABELS), 64, 64, seed=11), LABELS)
    return root


def var_prep(*args, cwd, env=None):
    """`var-prep ...` in a fresh process started in `cwd`, as a user types it."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("VAR_TRAIN_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "data_prep.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def extract_args(source, vae, out, *extra):
    return ["extract", str(source), "--vae", str(vae), "--out", str(out), "--resolution", "64", "--patch-nums",
            "1,2,3,4", "--shard-size", "2", "--batch-size", "2", "--num-workers", "0", "--no-progress", *extra]


def shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


def test_a_folder_typed_otherwise_from_another_directory_resumes(tmp_path, images):
    vae, _ = tiny_vae_checkpoint(tmp_path)
    first = var_prep(*extract_args("images", vae, "../tokens", "--max-shards", "1"), cwd=tmp_path / "data")
    assert first.returncode == 0 and "not complete yet" in first.stdout, first.stdout + first.stderr
    # From another directory, by an absolute path through a symbolic link to the same folder.
    (tmp_path / "link").symlink_to(images)
    (tmp_path / "elsewhere").mkdir()
    second = var_prep(*extract_args(tmp_path / "link", vae, tmp_path / "tokens"), cwd=tmp_path / "elsewhere")
    assert second.returncode == 0 and "this run: 3 shard(s)" in second.stdout, second.stdout + second.stderr
    assert "complete: 7 records in 4 shards" in second.stdout
    run_extract(images, vae, tmp_path / "whole", shard_size=2)
    assert shard_bytes(tmp_path / "tokens") == shard_bytes(tmp_path / "whole")
    config = json.loads((tmp_path / "tokens" / "extract_config.json").read_text())
    assert config["source"]["root"] == str(images.resolve())


def test_other_images_labels_or_folder_are_still_refused(tmp_path, images, monkeypatch):
    vae, _ = tiny_vae_checkpoint(tmp_path)
    monkeypatch.chdir(tmp_path)
    run_extract("data/images", vae, tmp_path / "tokens", shard_size=2, max_shards=1)
    copy = tmp_path / "copy"
    shutil.copytree(images, copy)
    with pytest.raises(MismatchError, match="other settings.*\n.*source.*copy"):
        run_extract(copy, vae, tmp_path / "tokens", shard_size=2)
    (images / "class1" / "img001.png").rename(images / "class0" / "img001.png")  # relabelled
    with pytest.raises(MismatchError, match="inputs_sha256"):
        run_extract(images, vae, tmp_path / "tokens", shard_size=2)
    (images / "class0" / "img001.png").rename(images / "class1" / "img001.png")
    shutil.copy(images / "class1" / "img001.png", images / "class1" / "img100.png")  # one image more
    with pytest.raises(MismatchError, match="inputs_sha256"):
        run_extract(images, vae, tmp_path / "tokens", shard_size=2)
    (images / "class1" / "img100.png").unlink()
    assert run_extract(images, vae, tmp_path / "tokens", shard_size=2).complete  # as it was: resumes


def test_a_list_and_tars_typed_otherwise_resume(tmp_path, images, monkeypatch):
    vae, _ = tiny_vae_checkpoint(tmp_path)
    paths = sorted(images.glob("*/*.png"))
    (tmp_path / "data" / "lists").mkdir()
    listing = tmp_path / "data" / "lists" / "train.csv"  # paths relative to the list's folder
    listing.write_text("".join(f"../images/{p.parent.name}/{p.name},{p.parent.name}\n" for p in paths))
    monkeypatch.chdir(tmp_path / "data")
    run_extract("lists/train.csv", vae, tmp_path / "from_list", shard_size=2, max_shards=1)
    monkeypatch.chdir(tmp_path / "data" / "lists")
    assert run_extract("train.csv", vae, tmp_path / "from_list", shard_size=2).complete
    # The same list text in another folder names other files: refused.
    (tmp_path / "other" / "lists").mkdir(parents=True)
    shutil.copytree(images, tmp_path / "other" / "images")
    shutil.copy(listing, tmp_path / "other" / "lists" / "train.csv")
    with pytest.raises(MismatchError, match="inputs_sha256"):
        run_extract(tmp_path / "other" / "lists" / "train.csv", vae, tmp_path / "from_list", shard_size=2)

    (tmp_path / "data" / "tars").mkdir()
    for part in range(2):
        with wds.TarWriter(str(tmp_path / "data" / "tars" / f"part-{part}.tar")) as writer:
            for path in paths[part::2]:
                writer.write({"__key__": path.stem, "png": path.read_bytes(), "cls": path.parent.name[-1].encode()})
    monkeypatch.chdir(tmp_path / "data")
    run_extract("tars", vae, tmp_path / "from_tars", shard_size=2, max_shards=1)
    monkeypatch.chdir(tmp_path)
    assert run_extract("data/tars/part-{0..1}.tar", vae, tmp_path / "from_tars", shard_size=2).complete


def test_bad_options_are_one_line_errors_and_write_nothing(tmp_path, images, capsys):
    vae, _ = tiny_vae_checkpoint(tmp_path)
    for option, message in [(("--num-workers", "-1"), "--num-workers must be 0"),
                            (("--batch-size", "0"), "--batch-size must be at least 1, got 0"),
                            (("--resolution", "0"), "--resolution must be at least 1, got 0"),
                            (("--device", "gpu7"), "'gpu7' is not a device")]:
        assert main(extract_args(images, vae, tmp_path / "out", *option)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
        assert "--patch-nums" not in err
        assert not (tmp_path / "out").exists()
    # A process that sees no GPU, as on a login node.
    proc = var_prep(*extract_args(images, vae, tmp_path / "out", "--device", "cuda"), cwd=tmp_path,
                    env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and proc.stderr.startswith("error: --device cuda: no CUDA GPU"), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_settings_of_a_run_that_finished_no_shard_may_be_replaced(tmp_path, images):
    vae, _ = tiny_vae_checkpoint(tmp_path)
    run_extract(images, vae, tmp_path / "earlier", shard_size=2, max_shards=1)
    # What a run that stopped before its first shard leaves: the settings alone (and a partial shard).
    (tmp_path / "out").mkdir()
    shutil.copy(tmp_path / "earlier" / "extract_config.json", tmp_path / "out")
    (tmp_path / "out" / "shard-000000.tar.tmp").write_bytes(b"half a shard")
    summary = run_extract(images, vae, tmp_path / "out", shard_size=2, flip=True)
    assert summary.complete and summary.num_records == 7
    assert json.loads((tmp_path / "out" / "extract_config.json").read_text())["flip"] is True
    # Once a shard is finished, other settings are refused as before.
    with pytest.raises(MismatchError, match="other settings.*\n.*flip: existing True, now False"):
        run_extract(images, vae, tmp_path / "out", shard_size=2)
    with pytest.raises(MismatchError, match="flip: existing False, now True"):
        run_extract(images, vae, tmp_path / "earlier", shard_size=2, flip=True)
