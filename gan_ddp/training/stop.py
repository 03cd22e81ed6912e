"""When a run stops, and how it says so: the stop rules, exit codes and marker files.

A signal (SIGTERM, SIGUSR1, Ctrl-C) or the time budget (`train.max_seconds`) stops training after the step in
progress, with a checkpoint; every `STOP_CHECK_EVERY` steps the processes agree (one collective), so they
stop at the same step. Job scripts read the marker files, since launchers hide a worker's exit code.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from gan_ddp.runtime.faults import is_relayed_copy

EXIT_OK = 0
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint written, run the same command again (launch/slurm.sbatch requeues)
# torchrun and `accelerate launch` turn a worker's 75 into their own exit code 1: on preemption the main
# process also writes this file into run.dir (removed when the run starts again), for job scripts.
PREEMPTED_MARKER = "PREEMPTED"
# Written by the main process when the run has reached its last step (removed when a run starts), so a job
# script that got a signal while training was already over does not requeue it (launch/slurm.sbatch).
DONE_MARKER = "DONE"
# Written by every process whose collective failed because another process or its host was lost (the error
# line inside): torchrun reports any failure as 1, so job scripts read this to requeue (launch/slurm.sbatch).
LOST_MARKER = "LOST"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # SIGINT: Ctrl-C stops like a preemption
STOP_CHECK_EVERY = 10  # steps between cross-process agreements on stopping (a collective, so not every step)


@dataclass
class StopRequest:
    signal: int = 0  # the signal number received, 0 if none
    at: float = 0.0  # when (time.monotonic)
    announce: bool = False  # the main process says what a Ctrl-C does

    def handler(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.signal and signum == signal.SIGINT:
            if not is_relayed_copy(signum, self.at, now):
                raise KeyboardInterrupt  # a second Ctrl-C: abort at once (exit 130, or 75 after the stop checkpoint)
            return
        if not self.signal:
            self.signal, self.at = signum, now
            if self.announce and signum == signal.SIGINT:  # os.write: no Python-level lock inside a handler
                os.write(2, b"\nCtrl-C: stopping after this step with a checkpoint; Ctrl-C again aborts at once\n")


@contextmanager
def signals_to(request: StopRequest) -> Iterator[StopRequest]:
    """STOP_SIGNALS set `request` inside the block; the previous handlers come back after it."""
    previous = {s: signal.signal(s, request.handler) for s in STOP_SIGNALS}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def agree_to_stop(accelerator: Any, request: StopRequest, out_of_time: bool) -> str | None:
    """Collective when several processes: "signal" if any rank got one, "time" if the main process's clock says
    the budget is spent (it decides for all), else None."""
    sig, timeout = float(request.signal), float(out_of_time)
    if accelerator.num_processes > 1:  # a signal may have reached only some ranks; rank 0's clock decides for all
        flags = torch.tensor([sig, timeout if accelerator.is_main_process else 0.0], device=accelerator.device)
        sig, timeout = accelerator.reduce(flags, reduction="sum").tolist()
    if sig:
        return "signal"
    return "time" if timeout else None
