"""`var-train fid-stats` and `var-train eval` end to end on tiny real models: resumable, ADM .npz
output, and the same samples and metrics with 2 processes (and another batch size) as with 1."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO_ROOT, run_torchrun
from tests.evaluation.helpers import blob_images, seeded_classifier
from tests.models.tiny import tiny_models
from var_train.cli import main as var_train
from var_train.models.checkpoint_io import save_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_cli")
    vae, var = tiny_models(seed=0)
    paths = {"vae": save_model(vae, root / "vae.safetensors"), "var": save_model(var, root / "var.safetensors"),
             "classifier": seeded_classifier(4).save(root / "classifier.safetensors")}
    folder = root / "real" / "all"
    folder.mkdir(parents=True)
    for i, image in enumerate(blob_images(24, seed=7, size=64).permute(0, 2, 3, 1).numpy()):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    paths["stats"] = root / "stats.npz"
    assert var_train(["fid-stats", "--images", str(root / "real"), "--feature-extractor", str(paths["classifier"]),
                      "--out", str(paths["stats"]), "--quiet"]) == 0
    paths["root"] = root
    return paths


def _eval_args(setup, out: Path, batch_size: int = 8) -> list[str]:
    return ["eval", "--var", str(setup["var"]), "--vae", str(setup["vae"]), "--reference", str(setup["stats"]),
            "--feature-extractor", str(setup["classifier"]), "--per-class", "2", "--batch-size", str(batch_size),
            "--top-k", "20", "--top-p", "0.9", "--seed", "5", "--out", str(out), "--quiet"]


@pytest.fixture(scope="module")
def one_rank(setup):
    out = setup["root"] / "one_rank"
    assert var_train(_eval_args(setup, out)) == 0
    return out


def test_fid_stats_writes_mu_sigma_and_features(setup):
    with np.load(setup["stats"]) as data:
        assert data["mu"].shape == (16,) and data["sigma"].shape == (16, 16) and data["mu"].dtype == np.float64
        assert data["features"].shape == (24, 16) and int(data["count"]) == 24 and int(data["resolution"]) == 64
        assert str(data["extractor"]).startswith("small-cnn-classifier-")


def test_eval_writes_pngs_adm_npz_and_json(one_rank):
    results = json.loads((one_rank / "results.json").read_text())
    for name in ("fid", "inception_score", "precision", "recall", "class_accuracy"):
        assert np.isfinite(results[name]), name
    assert results["num_samples"] == 20 and results["generated_now"] == 20 and results["world_size"] == 1
    assert results["settings"]["top_k"] == 20 and results["settings"]["cfg"] == 1.5
    pngs = sorted((one_rank / "samples").glob("*.png"))
    assert [p.name for p in pngs[:3]] == ["000000_c0000.png", "000001_c0001.png", "000002_c0002.png"]
    with np.load(one_rank / "samples.npz") as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.shape == (20, 64, 64, 3) and images.dtype == np.uint8
    assert labels.tolist() == [i % 10 for i in range(20)]
    np.testing.assert_array_equal(images[13], np.asarray(Image.open(pngs[13]).convert("RGB")))


def test_eval_resumes_without_regenerating_finished_samples(setup, one_rank, tmp_path):
    out = tmp_path / "resumed"
    (out / "samples").mkdir(parents=True)
    # a previous run that wrote samples 0-11, then died
    for png in sorted((one_rank / "samples").glob("*.png"))[:12]:
        (out / "samples" / png.name).write_bytes(png.read_bytes())
    marker = out / "samples" / "000003_c0003.png"
    Image.new("RGB", (64, 64)).save(marker)  # a finished sample is kept as it is, never regenerated
    kept = marker.read_bytes()
    assert var_train(_eval_args(setup, out)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["generated_now"] == 8 and results["reused_from_previous_run"] == 12  # only the missing ones
    assert marker.read_bytes() == kept
    for index in range(12, 20):  # generated in other batches now, yet identical to the first run's
        name = sorted((one_rank / "samples").glob(f"{index:06d}_*.png"))[0].name
        assert (out / "samples" / name).read_bytes() == (one_rank / "samples" / name).read_bytes()


def test_eval_with_two_ranks_gives_the_same_samples_and_metrics(setup, one_rank, tmp_path):
    """A sample's seed follows its global index: 2 ranks with batches of 3 make exactly the images
    of 1 rank with batches of 8."""
    out = tmp_path / "two_ranks"
    proc = run_torchrun(REPO_ROOT / "var_train" / "cli" / "__main__.py", *_eval_args(setup, out, batch_size=3),
                        nproc=2, timeout=300)
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2, proc.stdout
    expected = json.loads((one_rank / "results.json").read_text())
    for name in ("fid", "inception_score", "precision", "recall", "class_accuracy"):
        assert results[name] == pytest.approx(expected[name], rel=1e-6, abs=1e-9), name
    with np.load(out / "samples.npz") as two, np.load(one_rank / "samples.npz") as one:
        np.testing.assert_array_equal(two["arr_0"], one["arr_0"])


def test_eval_reports_a_missing_reference_before_sampling(setup, tmp_path, capsys):
    args = _eval_args(setup, tmp_path / "out")
    args[args.index("--reference") + 1] = str(tmp_path / "nope.npz")
    assert var_train(args) == 2  # a user error: one line, no traceback
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and f"reference not found: {tmp_path / 'nope.npz'}" in errors[0], errors
    assert not (tmp_path / "out" / "samples").exists()


@pytest.mark.parametrize("command", ["eval", "fid-stats"])
def test_a_mistyped_input_is_named_before_the_missing_inception_file(setup, tmp_path, capsys, monkeypatch, command):
    """No Inception weights on this machine (an empty TORCH_HOME) and a mistyped input: the input is
    what the user hears about first, not the 95 MB download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    missing = tmp_path / "nope"
    if command == "eval":
        args = ["eval", "--var", setup["var"], "--vae", setup["vae"], "--reference", missing, "--out", tmp_path / "o"]
    else:
        args = ["fid-stats", "--images", missing, "--out", tmp_path / "stats.npz", "--device", "cpu"]
    assert var_train([str(a) for a in args + ["--quiet"]]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and f"not found: {missing}" in errors[0] and "Inception" not in errors[0], errors
