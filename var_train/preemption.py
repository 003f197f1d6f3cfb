"""Preemption: SIGTERM or SIGUSR1 -> checkpoint at the next step boundary -> exit 42.

Slurm sends SIGUSR1 ahead of the time limit when the job asks for it (`--signal=USR1@120`) and
SIGTERM on preemption or `scancel`. The handler only sets a flag; at each step boundary the ranks
agree on it with one all-reduce (a signal may reach only some ranks), every rank saves its part
of the checkpoint, and the process exits with EXIT_CODE_PREEMPTED. A requeue script
(`slurm/lib/requeue.sh`) requeues the job on that code; the new job resumes automatically.
"""

from __future__ import annotations

import signal

import torch

from var_train.parallel.distributed import all_reduce_max

EXIT_CODE_PREEMPTED = 42
EXIT_CODE_NONFINITE = 43  # too many consecutive non-finite steps: not worth requeueing
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def install(self) -> "PreemptionHandler":
        for sig in HANDLED_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        self.received = signum

    def should_stop(self, device: torch.device) -> bool:
        """Collective: True on every rank if any rank received a signal."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        return bool(all_reduce_max(flag).item())
