"""How a process of a multi-process launch ends: without the interpreter teardown in which gloo's worker
threads abort it (tests/_gloo_exit.py sets that abort up), after everything sys.exit would have done."""

from __future__ import annotations

import atexit
import subprocess
import sys
import threading

import pytest
from _runs import REPO, base_env, free_port

from gan_ddp.commands import cli
from gan_ddp.runtime import distributed

PROBE = REPO / "tests" / "_gloo_exit.py"


def _two_processes(how: str) -> list[subprocess.CompletedProcess]:
    env = base_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    procs = [
        subprocess.Popen(
            [sys.executable, str(PROBE), how],
            cwd=REPO,
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=120), p.stdout.read()) for p in procs]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_process_that_leaves_never_meets_the_gloo_teardown_abort():
    # sys.exit instead ("plain") aborted 3 of 8 exits of rank 0 here (and 3 of 10 in a second run of 10):
    # 8 clean exits in a row by chance would have a probability of (5/8) ** 8, about 2 %
    for attempt in range(8):
        rank0, rank1 = _two_processes("leave")
        assert "terminate called" not in rank0.stdout, (attempt, rank0.stdout[-2000:])
        assert (rank0.returncode, rank1.returncode) == (0, 0), (attempt, rank0.stdout[-2000:], rank1.stdout[-2000:])


def test_leave_process_does_what_sys_exit_would_first(monkeypatch):
    """In the interpreter's order: threads (the threading module's shutdown), atexit handlers, then the exit. Faked
    here: the real threading shutdown would end this test process's own thread pools."""
    seen: list[str] = []
    monkeypatch.setattr(threading, "_shutdown", lambda: seen.append("threads"))
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: seen.append("atexit"))
    monkeypatch.setattr(distributed.os, "_exit", lambda code: seen.append(f"exit {code}"))
    distributed.leave_process(3)
    assert seen == ["threads", "atexit", "exit 3"]


LEAVING = """
import atexit, threading, time
from concurrent.futures import ThreadPoolExecutor
from gan_ddp.runtime.distributed import leave_process
pool = ThreadPoolExecutor(1)  # an idle pool thread (inductor's compile workers, trackers): not a daemon
pool.submit(print, "pool", flush=True).result()
threading.Thread(target=lambda: (time.sleep(0.5), print("thread", flush=True))).start()
atexit.register(print, "atexit", flush=True)
leave_process(3)
"""


def test_leave_process_ends_a_process_with_an_idle_thread_pool_after_its_threads_and_atexit():
    # Joining every non-daemon thread without the threading module's exit hooks waited forever on the idle pool thread.
    proc = subprocess.run([sys.executable, "-c", LEAVING], cwd=REPO, env=base_env(), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stdout.split() == ["pool", "thread", "atexit"]


@pytest.mark.parametrize(
    ("world_size", "leaves"), [("2", True), ("1", False), (None, False)], ids=["launched", "one", "plain"]
)
def test_entry_leaves_only_processes_of_a_multi_process_launch(monkeypatch, world_size, leaves):
    import torch.distributed  # noqa: F401  (what a training command has loaded by the time it returns)

    left: list[int] = []
    monkeypatch.setattr(cli, "main", lambda: 5)
    monkeypatch.setattr(distributed, "leave_process", left.append)
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    with pytest.raises(SystemExit) as exited:
        cli.entry()
    assert exited.value.code == 5
    assert left == ([5] if leaves else [])
