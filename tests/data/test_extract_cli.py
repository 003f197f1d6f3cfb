import json
from pathlib import Path

import pytest

from data_prep.cli import main
from tests.conftest import run_torchrun
from tests.data.extract_helpers import random_images, read_records, run_extract, tiny_vae_checkpoint, write_image_folder
from var_train.data import build_token_loader, read_manifest

WORKER = Path(__file__).with_name("extract_worker.py")


@pytest.mark.distributed
def test_two_rank_extraction_equals_one_rank(tmp_path):
    vae_path, _ = tiny_vae_checkpoint(tmp_path)
    write_image_folder(tmp_path / "images", random_images(7, 72, 64, seed=5), [0, 1, 0, 1, 0, 1, 0])
    (tmp_path / "images" / "class1" / "broken.png").write_bytes(b"\x89PNG broken")
    run_extract(tmp_path / "images", vae_path, tmp_path / "one", shard_size=2, flip=True)
    proc = run_torchrun(WORKER, str(tmp_path / "images"), "--vae", str(vae_path), "--out", str(tmp_path / "two"),
                        "--resolution", "64", "--patch-nums", "1,2,3,4", "--shard-size", "2", "--flip",
                        "--batch-size", "2", "--num-workers", "0", "--min-size", "8", "--no-progress",
                        nproc=2, timeout=300)
    assert "complete: 7 records in 4 shards" in proc.stdout
    one, two = read_manifest(tmp_path / "one"), read_manifest(tmp_path / "two")
    assert one.shards == two.shards and one.num_records == two.num_records == 7
    assert one.skipped == two.skipped == {"not a readable image": 1}
    for shard in one.shards:
        assert (tmp_path / "one" / shard.name).read_bytes() == (tmp_path / "two" / shard.name).read_bytes()
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["skipped"][0]["source"].endswith("broken.png")


def test_cli_extract_then_load(tmp_path, capsys):
    vae_path, _ = tiny_vae_checkpoint(tmp_path)
    write_image_folder(tmp_path / "images", random_images(6, 64, 64, seed=6), [0, 1, 2, 0, 1, 2])
    code = main(["extract", str(tmp_path / "images"), "--vae", str(vae_path), "--out", str(tmp_path / "tokens"),
                 "--resolution", "64", "--patch-nums", "1,2,3,4", "--crops", "2", "--num-workers", "1",
                 "--min-size", "8", "--no-progress"])
    assert code == 0 and "complete: 6 records" in capsys.readouterr().out
    records = read_records(tmp_path / "tokens")
    assert all(r.tokens.shape == (2, 30) and r.tokens_flip is None for r in records)
    loader = build_token_loader(tmp_path / "tokens", batch_size=3, patch_nums=(1, 2, 3, 4), vocab_size=64,
                                num_classes=3, rank=0, world_size=1, num_workers=0)
    batches = list(loader)
    assert len(batches) == 2 and sorted(l for b in batches for l in b.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert all(int(t.max()) < 64 for b in batches for t in b.tokens_per_scale)


def test_cli_rejects_bad_patch_nums(capsys):
    with pytest.raises(SystemExit):
        main(["extract", "x", "--vae", "v", "--out", "o", "--patch-nums", "4,3"])
    assert "increasing" in capsys.readouterr().err


def test_missing_vae_is_a_clear_error(tmp_path):
    write_image_folder(tmp_path / "images", random_images(1, 64, 64), [0])
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        run_extract(tmp_path / "images", tmp_path / "nope.pth", tmp_path / "t")


def test_demo_data_writes_the_digits(tmp_path, capsys):
    assert main(["demo-data", "--out", str(tmp_path / "digits"), "--resolution", "32"]) == 0
    assert "wrote 1797 images in 10 classes" in capsys.readouterr().out
    folders = sorted(p.name for p in (tmp_path / "digits").iterdir())
    assert folders == [str(d) for d in range(10)]
    files = list((tmp_path / "digits").glob("*/*.png"))
    assert len(files) == 1797
    import numpy as np
    from PIL import Image
    image = Image.open(files[0])
    assert image.size == (32, 32) and image.mode == "RGB"
    assert len(np.unique(np.asarray(image))) > 10  # smooth strokes, not a blank or binary image
