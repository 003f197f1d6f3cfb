"""Shared pieces of the reliability tests: the commands as a user runs them, a tiny dataset
extracted with a real VQVAE, and a size-limited file system for disk-full tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import REPO_ROOT
from tests.data.extract_helpers import random_images, tiny_vae_checkpoint, write_image_folder

NUM_IMAGES, NUM_CLASSES = 16, 2


def environment(**extra: str) -> dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("VAR_TRAIN_DEBUG", None)
    env.update(extra)
    return env


def run_command(tool: str, *args: str, timeout: float = 600, env: dict | None = None,
                prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`var-train ...` / `var-prep ...` in a fresh process (as a user runs them)."""
    module = {"var-train": "var_train.cli", "var-prep": "data_prep.cli"}[tool]
    return subprocess.run([*prefix, sys.executable, "-m", module, *map(str, args)], cwd=REPO_ROOT,
                          env=env or environment(), capture_output=True, text=True, timeout=timeout)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error")]


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, exactly one `error: ...` line on stderr containing `fragments`, and no traceback."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    lines = error_lines(proc)
    assert len(lines) == 1, output
    assert "Traceback" not in output, output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def make_dataset(root: Path, vae: Path, name: str = "tokens") -> Path:
    """NUM_IMAGES 64px images in NUM_CLASSES classes -> token shards through `var-prep extract`."""
    images = root / "images"
    if not images.exists():
        write_image_folder(images, random_images(NUM_IMAGES, 64, 64, seed=3), [i % NUM_CLASSES for i in range(NUM_IMAGES)])
    out = root / name
    proc = run_command("var-prep", "extract", images, "--vae", vae, "--out", out, "--resolution", "64",
                       "--patch-nums", "1,2,3,4", "--shard-size", "4", "--batch-size", "4", "--num-workers", "0",
                       "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def other_codebook_vae(root: Path) -> Path:
    """The tiny VQVAE with the same shapes but another codebook (and phi convs), same file format."""
    from var_train.models.checkpoint_io import save_reference_layout

    _, vae = tiny_vae_checkpoint(root)
    with torch.no_grad():
        vae.quantize.embedding.weight.copy_(torch.randn_like(vae.quantize.embedding.weight))
    return save_reference_layout(vae, root / "other_vae.pth")


def train_args(shards: Path, vae: Path, run_dir: Path, *overrides: str) -> list[str]:
    return ["train", "--recipe", "recipes/tiny.yaml", f"data.train_shards={shards}", f"data.vae={vae}",
            f"run.output_dir={run_dir}", f"model.num_classes={NUM_CLASSES}", "data.num_workers=0",
            "optim.global_batch_size=4", "parallel.engine=ddp", *overrides]


# -- a small file system that fills up ------------------------------------------------------------------
@contextlib.contextmanager
def small_filesystem(path: Path, size: str = "2m"):
    """A real tmpfs of `size` mounted at `path`; unmounted afterwards. Mounting needs root (CI and the
    dev box run the suite as root); elsewhere the test is skipped with the reason."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a disk-full test mounts a small tmpfs, which needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
