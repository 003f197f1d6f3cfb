"""DataLoader workers under Slurm's signals: a SIGTERM/SIGUSR1/SIGINT from anyone but the parent
(slurmstepd signals every process of a step) leaves the worker running; the parent can still stop
it with SIGTERM, so a program that exits with a live loader iterator does not hang."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from torch.utils.data import DataLoader, IterableDataset

from tests.conftest import REPO_ROOT
from var_train.data.loader import ignore_stop_signals, stop_signals_blocked


class Pids(IterableDataset):
    """Yields the worker's pid, slowly, forever."""

    def __iter__(self):
        while True:
            time.sleep(0.01)
            yield os.getpid()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purpose
        return f.read().split(")")[-1].split()[0] != "Z"


def test_a_worker_survives_other_senders_and_stops_for_its_parent():
    loader = DataLoader(Pids(), batch_size=None, num_workers=1, worker_init_fn=ignore_stop_signals)
    with stop_signals_blocked():
        batches = iter(loader)
    worker = int(next(batches))
    for sig in ("TERM", "USR1", "INT"):  # sent by another process, as slurmstepd does
        subprocess.run(["kill", f"-{sig}", str(worker)], check=True)
    time.sleep(0.5)
    assert alive(worker)
    assert int(next(batches)) == worker  # still delivering

    os.kill(worker, signal.SIGTERM)  # the parent's SIGTERM (multiprocessing's exit handler) still stops it
    deadline = time.time() + 10
    while alive(worker) and time.time() < deadline:
        time.sleep(0.05)
    assert not alive(worker)
    del batches


def test_exiting_with_a_live_iterator_does_not_hang():
    code = ("from tests.data.test_worker_signals import Pids; from torch.utils.data import DataLoader; "
            "from var_train.data.loader import ignore_stop_signals; "
            "it = iter(DataLoader(Pids(), batch_size=None, num_workers=2, worker_init_fn=ignore_stop_signals)); "
            "print(next(it), flush=True)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 0, proc.stderr
