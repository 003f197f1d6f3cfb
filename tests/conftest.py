"""Shared test helpers: fixture paths and a torchrun launcher for multi-process CPU tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures" / "var_reference"

# Keep tests light on the 2-core CI machine and never talk to the network.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def reference_fixture_dir() -> Path:
    return Path(os.environ.get("VAR_REFERENCE_FIXTURES", DEFAULT_FIXTURES))


def reference_fixture_paths() -> list[Path]:
    return sorted(reference_fixture_dir().glob("*.pt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: str | Path, *args: str, nproc: int = 2, timeout: float = 420,
                 env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run `script` under torchrun with `nproc` CPU processes (gloo); return the finished process.

    On failure (or timeout) the combined output is put into the assertion message, so a failing
    distributed test shows what every rank printed.
    """
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
                "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--nnodes=1", f"--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           str(script), *map(str, args)]
    try:
        proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"torchrun timed out after {timeout}s: {' '.join(cmd)}\n{out[-4000:]}\n{err[-4000:]}")
    if check and proc.returncode != 0:
        pytest.fail(f"torchrun exited {proc.returncode}: {' '.join(cmd)}\n"
                    f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_in_the_session_folder(tmp_path_factory):
    """The tests' subprocesses make their temporary files under this session's pytest folder (which
    pytest prunes, keeping the last 3 sessions), not in /tmp, which nothing prunes: torchrun alone
    leaves a torchelastic_* folder there on every run, and a full disk has broken CI before."""
    folder = tmp_path_factory.mktemp("tmpdir")
    patch = pytest.MonkeyPatch()
    patch.setenv("TMPDIR", str(folder))
    patch.setattr(tempfile, "tempdir", None)  # this process's tempfile reads TMPDIR again
    yield folder
    patch.undo()
