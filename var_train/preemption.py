"""Stopping a run without losing work: signal -> checkpoint at the next step boundary -> exit.

- SIGTERM or SIGUSR1 (Slurm: preemption or `scancel`, and the warning signal a job asks for with
  `--signal=USR1@120`): exit EXIT_CODE_PREEMPTED (42). A requeue script (`slurm/lib/requeue.sh`)
  requeues the job on that code; the new job resumes automatically.
- SIGINT (Ctrl-C): the user's stop; exit EXIT_CODE_INTERRUPTED (130, the shell's code for Ctrl-C).
  Rerunning the command resumes. Ctrl-C again, a second or more later, quits at once without
  saving (KeyboardInterrupt), and so does a SIGTERM then (torchrun turns a second press into
  one). Presses closer together count as one, because under torchrun a worker gets the
  terminal's SIGINT and, a moment later, the one torchrun relays.

The handler only records what arrived; at each step boundary the ranks agree with one all-reduce
(a signal may reach only some ranks), every rank saves its part of the checkpoint, and the
process exits with the code. Preemption wins over Ctrl-C: the job should be requeued.
"""

from __future__ import annotations

import signal
import sys
import time

import torch

from var_train.parallel.distributed import all_reduce_max

EXIT_CODE_PREEMPTED = 42
EXIT_CODE_NONFINITE = 43  # too many consecutive non-finite steps: not worth requeueing
EXIT_CODE_INTERRUPTED = 130
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
REPEATED_CTRL_C_SECONDS = 1.0  # a second SIGINT within this is the same press (relayed by torchrun)


class PreemptionHandler:
    def __init__(self, announce: bool = True):
        self.received: int | None = None  # the preemption signal, if one arrived
        self.interrupted_at: float | None = None  # monotonic time of the first Ctrl-C
        self.announce = announce  # print one line on Ctrl-C (rank 0)
        self._previous = {}

    def install(self) -> "PreemptionHandler":
        for sig in (*PREEMPTION_SIGNALS, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        now = time.monotonic()
        if self.interrupted_at is not None and now - self.interrupted_at > REPEATED_CTRL_C_SECONDS:
            # A second Ctrl-C; torchrun passes a second press on as SIGTERM. The checkpoint being
            # written, if any, is not committed; the newest complete one stays.
            raise KeyboardInterrupt
        if signum != signal.SIGINT:
            self.received = signum
        elif self.interrupted_at is None:
            self.interrupted_at = now
            if self.announce:
                print("Ctrl-C: saving a checkpoint at the end of this step, then exiting "
                      f"{EXIT_CODE_INTERRUPTED} (rerun to resume; Ctrl-C again to quit now without saving)",
                      file=sys.stderr, flush=True)

    def stop_code(self, device: torch.device, planned: bool = False) -> int | None:
        """Collective: the exit code every rank stops with (EXIT_CODE_PREEMPTED if any rank was
        preempted, else EXIT_CODE_INTERRUPTED if any got Ctrl-C), or None to go on. `planned`: the
        run's own stop_after_steps has come, which stops like a preemption (a rehearsal of one)."""
        local = 2.0 if self.received is not None else 1.0 if self.interrupted_at is not None else 0.0
        agreed = int(all_reduce_max(torch.tensor([local], device=device)).item())
        code = {0: None, 1: EXIT_CODE_INTERRUPTED, 2: EXIT_CODE_PREEMPTED}[agreed]
        return EXIT_CODE_PREEMPTED if code is None and planned else code


def stop_message(code: int, step: int) -> str:
    """What a run that stopped with `code` (after saving its checkpoint at `step`) tells the user."""
    if code == EXIT_CODE_INTERRUPTED:
        return f"interrupted: checkpoint saved at step {step}; run the same command to resume"
    return (f"preempted: checkpoint saved at step {step}; exiting with {EXIT_CODE_PREEMPTED} so the job can be "
            f"requeued (a rerun resumes)")
