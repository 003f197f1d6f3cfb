"""A real Slurm for the tests in this folder: the one-node cluster of .ci/slurm_up.sh (two slurmd on
this machine), started here when it is not up yet and stopped again afterwards (by PID).

The tests skip, with the reason, only where the cluster cannot be had: not root, or neither Slurm
nor apt-get installed. Anything else that keeps Slurm from starting is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

STATE = Path(os.environ.get("SLURM_CI_STATE", "/tmp/var-train-slurm-ci"))


def cluster_is_up() -> bool:
    if not (STATE / "ready").exists() or shutil.which("sinfo") is None:
        return False
    proc = subprocess.run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%t"], capture_output=True, text=True)
    states = proc.stdout.split()
    return proc.returncode == 0 and len(states) == 2 and all(s.rstrip("*") in ("idle", "mix", "alloc") for s in states)


@pytest.fixture(scope="session")
def slurm_cluster():
    started = False
    if not cluster_is_up():
        if os.geteuid() != 0:
            pytest.skip("real-Slurm tests need root to start slurmctld/slurmd (CI runs them as root)")
        if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
            pytest.skip("real-Slurm tests need slurm-wlm installed or apt-get to install it")
        proc = subprocess.run(["bash", str(REPO_ROOT / ".ci" / "slurm_up.sh")], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        reason = STATE / "skip_reason"
        if reason.exists():
            pytest.skip(f"real-Slurm tests: {reason.read_text().strip()}")
        assert cluster_is_up(), proc.stderr
        started = True
    yield
    if started:
        subprocess.run(["bash", str(REPO_ROOT / ".ci" / "slurm_down.sh")], timeout=120)
