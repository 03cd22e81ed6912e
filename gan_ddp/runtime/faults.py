"""How failures reach the user: one `error:` line and an exit code per kind of fault (docs/faults.md).

Pure functions on exceptions, by class name or errno, so that the command line needs no import of the
heavy modules that raise them. The exit codes:

    0   finished (or train.max_seconds reached)      1   crash; a lost or stalled process of a multi-process run
    2   bad input: config, data, checkpoint, launch, run.dir in use
    3   diverged: non-finite losses or weights (gan_ddp.runtime.guard)
    74  I/O error writing or reading the run directory (EX_IOERR)
    75  stopped by SIGTERM/SIGUSR1/SIGINT after a checkpoint (EX_TEMPFAIL; training.stop.EXIT_PREEMPTED), also when
        signalled again while shutting down after it; or by SIGTERM/SIGUSR1 outside the training loop (start-up,
        shut-down): nothing to save, rerun resumes
    130 aborted by a second Ctrl-C (no checkpoint), or a Ctrl-C outside the training loop
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import signal
import sys
import time
from pathlib import Path

EXIT_CRASH = 1
EXIT_USAGE = 2
EXIT_DIVERGED = 3  # gan_ddp.runtime.guard.EXIT_DIVERGED
EXIT_IO = 74
EXIT_PREEMPTED = 75  # training.stop.EXIT_PREEMPTED
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process killed by Ctrl-C

# errno -> what the user should read. Everything else keeps the system's own words.
IO_CAUSES = {
    errno.ENOSPC: "disk full (no space left on device)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only filesystem",
    errno.ENOTDIR: "a component of the path is a file, not a directory",
    errno.EISDIR: "is a directory, expected a file",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "input/output error from the device",
    errno.ENAMETOOLONG: "file name too long",
    errno.EMFILE: "too many open files",
    errno.ENFILE: "too many open files in the system",
}
_STRERRORS = {os.strerror(code): code for code in IO_CAUSES}
_OS_ERROR_NUMBER = re.compile(r"\(os error (\d+)\)")  # how Rust libraries (safetensors) quote errno


def io_error_line(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    cause = IO_CAUSES.get(exc.errno or 0) or exc.strerror or str(exc)
    path = exc.filename if exc.filename is not None else "?"
    if exc.errno == errno.ENOTDIR and os.path.isfile(path):  # the path itself, not a component above it
        cause = "is a file, not a directory"
    return f"{path}: {cause}{f' ({name})' if name else ''}"


def as_os_error(exc: BaseException, path: Path) -> OSError | None:
    """An OSError naming `path` for an error raised while writing under `path`, or None if it is not an
    I/O error. safetensors raises `SafetensorError("... No space left on device (os error 28)")` and
    torch.save a RuntimeError without any errno ("unexpected pos 576 vs 534" on a full disk), so the
    library's message is read first and the free space of the filesystem checked last."""
    if isinstance(exc, OSError):
        if exc.filename is None:
            exc.filename = str(path)
        return exc
    message = str(exc)
    found = _OS_ERROR_NUMBER.search(message)
    code = int(found.group(1)) if found else next((c for s, c in _STRERRORS.items() if s in message), None)
    if code is None and type(exc).__name__ in ("SafetensorError", "RuntimeError") and _disk_full(path):
        code = errno.ENOSPC
    if code is None:
        return None
    return OSError(code, os.strerror(code), str(path))


def _disk_full(path: Path) -> bool:
    for candidate in (path, *path.parents):
        try:
            st = os.statvfs(candidate)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize < (1 << 20)
    return False


def collective_failure(exc: BaseException) -> str | None:
    """One line for a collective that failed because another process stalled or died (gloo's messages)."""
    message = str(exc)
    # set by the trainer (distributed.lost_peers): who did not answer, or that this host is the one cut off
    who = getattr(exc, "lost_peers", None)
    waited = re.search(r"Timed out waiting (\d+)ms", message)
    if waited or (type(exc).__name__ == "DistBackendError" and "timed out" in message.lower()):
        seconds = f" {int(waited.group(1)) / 1000:g} s" if waited else ""
        cause = who or (
            "another process of this run stalled (stopped, swapping, stuck on I/O), hangs, or its host was lost"
        )
        return (
            f"a collective operation timed out after{seconds} (train.collective_timeout_s): {cause}; nothing was "
            "written after the newest checkpoint: rerun the same command to resume from it"
        )
    peer = re.search(r"(?:Connection (?:closed|reset) by peer|Read error|Write error)\D*\[([^\]]+)\]:\d+", message)
    if "Connection closed by peer" in message or "Connection reset by peer" in message or peer:
        where = f" at {_host_name(peer.group(1))}" if peer else ""
        cause = who or (
            f"another process of this run{where} died or its host went away (connection closed by peer); "
            "its own output says why"
        )
        return f"{cause}; rerun the same command to resume from the newest checkpoint"
    return None


def _host_name(address: str) -> str:
    """ "10.0.0.2" -> "node2 (10.0.0.2)" where the address has a name (/etc/hosts, DNS), else the address."""
    import socket

    try:
        return f"{socket.gethostbyaddr(address)[0]} ({address})"
    except OSError:
        return address


def describe(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, one line) for failures raised outside gan-ddp's own error classes (`GanDdpError`, which
    carry their exit code): OS errors and failed collectives. None means a crash: let the traceback show."""
    if isinstance(exc, OSError) and exc.errno in IO_CAUSES:
        return EXIT_IO, io_error_line(exc)
    line = collective_failure(exc)
    if line is not None:
        return EXIT_CRASH, line
    return None


def is_echo(exc: BaseException) -> bool:
    """True on ranks other than 0 for an error every rank raises together: print it once, from rank 0."""
    return bool(getattr(exc, "all_ranks", False)) and os.environ.get("RANK", "0") != "0"


# ------------------------------------------------------------------------------ signals outside the loop
INTERRUPTED_LINE = "interrupted (Ctrl-C); nothing was written after the newest checkpoint"


def stopped_line(signum: int) -> str:
    if signum == signal.SIGINT:
        return INTERRUPTED_LINE
    return (
        f"stopped by {signal.Signals(signum).name} (outside the training loop: no checkpoint to write); rerun the "
        "same command (a training resumes from its newest checkpoint)"
    )


# A Ctrl-C on a terminal reaches torchrun and its workers at once, and torchrun relays it to them again a few ms
# later (later still on a loaded machine): a second SIGINT counts only if it comes later than this after the first.
SECOND_INTERRUPT_AFTER_S = 1.0
STOPPED_AGAIN_LINE = "stopped again while shutting down; the stop checkpoint is complete: rerun the same command"

# time.monotonic() of the signal whose stop checkpoint this process has written (training.stop), else None:
# from then on the exit code is 75 whatever comes, and the relayed copy of that Ctrl-C is not a second one.
_checkpointed_stop_at: float | None = None


def stopped_after_checkpoint(at: float | None) -> None:
    """The trainer says its stop checkpoint is written (`at`: when the stop signal came), or None when a run starts."""
    global _checkpointed_stop_at
    _checkpointed_stop_at = at


def after_stop_checkpoint() -> bool:
    return _checkpointed_stop_at is not None


def is_relayed_copy(signum: int, first_at: float, now: float) -> bool:
    """A SIGINT within SECOND_INTERRUPT_AFTER_S of the first stop signal: the launcher's relay, not a second Ctrl-C."""
    return signum == signal.SIGINT and now - first_at <= SECOND_INTERRUPT_AFTER_S


def _exit_at_once(signum: int, frame: object) -> None:
    """Before the training loop has its own handlers (imports, data, models, the process group, resuming) and
    after it: one line from rank 0 and a documented exit code, at once. Nothing held needs a goodbye: the
    kernel releases run.lock's flock with the process, a half-written checkpoint is a `.tmp-*` that the next
    start removes, and atomic writes leave the old file whole. os.write/os._exit: no locks in a handler.
    After a stop checkpoint (the run shutting down with exit 75): the relayed copy of the stop's Ctrl-C is
    ignored, and any later signal keeps exit 75, since everything a resume needs is written."""
    if _checkpointed_stop_at is None:
        line, code = stopped_line(signum), EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_PREEMPTED
    elif is_relayed_copy(signum, _checkpointed_stop_at, time.monotonic()):
        return
    else:
        line, code = STOPPED_AGAIN_LINE, EXIT_PREEMPTED
    if os.environ.get("RANK", "0") in ("", "0"):
        os.write(2, f"error: {line}\n".encode())
    os._exit(code)


def exit_on_signals() -> None:
    """Install `_exit_at_once` for SIGTERM, SIGUSR1 and SIGINT (without it: exit 143 and no word for
    SIGTERM, a traceback for Ctrl-C). The trainer's loop replaces these with its stop-after-checkpoint
    handlers and puts them back after. Main thread only, as signal.signal requires."""
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, _exit_at_once)


def running_as_command(argv: list[str] | None = None, orig_argv: list[str] | None = None) -> bool:
    """Whether this process is the `gan-ddp` command (console script or `python -m gan_ddp`, which torchrun
    and `accelerate launch -m` run too), rather than a program that imports gan_ddp as a library."""
    argv = sys.argv if argv is None else argv
    orig = getattr(sys, "orig_argv", []) if orig_argv is None else orig_argv
    if argv and os.path.basename(argv[0]) == "gan-ddp":
        return True
    return any(a == "-m" and b == "gan_ddp" for a, b in itertools.pairwise(orig)) or "-mgan_ddp" in orig
