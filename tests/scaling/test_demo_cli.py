"""`var-train scaling demo` as a user meets it: its --help, and its last line after the fit."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT
from tests.scaling.test_fit import small_sweep
from tests.training.learnable_shards import make_learnable_shards

DEMO_OPTIONS = ("--out", "--depths", "--epochs", "--crops", "--nproc", "--vae", "--tokenizer-minutes", "--seed")


def test_demo_help_describes_the_demo_and_every_option_with_its_default():
    proc = subprocess.run([sys.executable, "-m", "var_train.cli", "scaling", "demo", "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    description, options = proc.stdout.split("options:", 1)
    assert "scikit-learn's digits" in description
    assert "plan: one job per depth" not in description  # not the parent command's description
    text = " ".join(options.split())  # argparse wraps the help lines
    starts = [text.index(f" {option} ") for option in DEMO_OPTIONS]
    for option, start, end in zip(DEMO_OPTIONS, starts, [*starts[1:], len(text)]):
        assert "(default" in text[start:end], (option, text[start:end])


def test_demo_lists_every_plot_it_wrote(tmp_path):
    """A demo whose stages are all done (the stages' outputs exist) only fits and reports: its last
    line names the three plots of the fit, scaling_losses.png included."""
    out = tmp_path / "demo"
    for index in range(1797):  # the digits, as the data stage leaves them (it checks the count)
        path = out / "images" / str(index % 10) / f"{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    (out / "split").mkdir(parents=True)
    (out / "split" / "done").touch()
    vae = tmp_path / "vae.safetensors"
    vae.touch()
    make_learnable_shards(out / "shards" / "train")
    make_learnable_shards(out / "shards" / "val", num_records=32)
    small_sweep(out / "runs", {1: 31_234, 2: 160_000, 3: 460_000})  # finished runs: not trained again
    proc = subprocess.run([sys.executable, "-m", "var_train.cli", "scaling", "demo", "--out", str(out), "--vae",
                           str(vae), "--depths", "1", "2", "3"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    fit = out / "fit"
    assert last.startswith(f"plots: {fit / 'scaling_params.png'}, {fit / 'scaling_compute.png'}, "
                           f"{fit / 'scaling_losses.png'}; "), last
    for name in ("scaling_params.png", "scaling_compute.png", "scaling_losses.png"):
        assert (fit / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
