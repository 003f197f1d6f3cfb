from pathlib import Path

import pytest
from PIL import Image

from tests.models.tiny import tiny_models
from var_train.cli import main
from var_train.generate import parse_classes
from var_train.models.checkpoint_io import save_model, save_reference_layout


def test_sample_command_writes_pngs_and_grid(tmp_path):
    vae, var = tiny_models()
    var_path = save_model(var, tmp_path / "var.safetensors")
    vae_path = save_reference_layout(vae, tmp_path / "vae.pth")  # the reference layout needs --patch-nums
    out = tmp_path / "samples"
    code = main(["sample", "--var", str(var_path), "--vae", str(vae_path), "--patch-nums", "1,2,3,4",
                 "--classes", "1,4-5", "--per-class", "2", "--top-k", "5", "--seed", "3", "--out", str(out)])
    assert code == 0
    pngs = sorted(p.name for p in out.glob("0*.png"))
    assert pngs == ["0001_0000.png", "0001_0001.png", "0004_0000.png", "0004_0001.png", "0005_0000.png", "0005_0001.png"]
    assert Image.open(out / "0004_0001.png").size == (64, 64)
    assert Image.open(out / "grid.png").size[0] > 64 * 2


def test_parse_classes():
    assert parse_classes("0,3-5", 10) == [0, 3, 4, 5]
    assert parse_classes(None, 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="outside"):
        parse_classes("12", 10)
