"""One process of a 2-process gloo group that ends the way tests/test_exit.py asks: `plain` (sys.exit) or
`leave` (gan_ddp's leave_process). Rank 0 is set up so that gloo's worker thread frees the last collective's
tensor late: the worker threads run under SCHED_IDLE on the main thread's CPU, so they get that CPU back only
when the main thread blocks, at the latest during the interpreter's teardown (made long by SlowTeardown).
That is the abort a finished 4-process training hit (pytorch#107298 leaves the group's threads alive):
with `plain` about one exit in three aborts here (3 of 8, 3 of 10), with `leave` none may."""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist


class SlowTeardown:
    def __del__(self) -> None:  # runs during the interpreter's teardown; sleeping hands the CPU to the worker
        time.sleep(1.0)


def delay_gloo_workers() -> None:
    cpu = min(os.sched_getaffinity(0))
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), {cpu})
        with open(f"/proc/self/task/{tid}/comm") as f:
            if f.read().strip() == "pt_gloo_runloop":
                os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))


def main(how: str) -> None:
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    if rank != 0:
        dist.all_reduce(torch.ones(1000))
        time.sleep(1.5)  # outlive rank 0's teardown: its group must not fail under it
        os._exit(0)
    delay_gloo_workers()
    sys.setswitchinterval(1000.0)  # from the collective's return to the teardown the main thread keeps the GIL
    x = torch.ones(1000)
    x.note = "a Python attribute: torch keeps the Python object while C++ holds the tensor"
    dist.all_reduce(x)
    del x  # the worker now holds the only reference to it
    globals()["slow"] = SlowTeardown()
    if how == "leave":
        from gan_ddp.runtime.distributed import leave_process

        leave_process(0)
    sys.exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
