"""One training per run directory: an exclusive lock on `<run.dir>/run.lock`, held by the main process.

`fcntl.flock` rather than a PID file: the kernel drops the lock when its holder dies in any way (kill -9,
OOM killer, a node that reboots), so a stale lock never blocks a rerun and nothing has to guess whether a
recorded PID is still alive. The file itself is never deleted (deleting a lock file while someone waits
on it is the classic race); it only holds, for the refusal message, who holds the lock.

On shared filesystems: NFS clients on Linux implement flock with NFS byte-range locks, so the lock holds
across nodes (unless the filesystem is mounted with `nolock` or `local_lock=flock|all`), and the server
releases the lock of a node that died when its lease expires (NFSv4: about 90 s). Lustre needs the
`flock` mount option (without it flock fails, and training goes on with a warning); CephFS and GPFS
support flock across clients.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from gan_ddp.errors import GanDdpError

LOCK_NAME = "run.lock"


class RunLockError(GanDdpError, RuntimeError):
    """Another process trains in this run directory; the message names it (host, PID, start time)."""

    all_ranks = True


class RunLock:
    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd < 0:
            return
        _HELD.pop(str(self.path), None)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = -1


# Locks this process holds, by path. flock conflicts between two opens of one file even in one process;
# a training that failed during set-up in a notebook or a test would otherwise lock its own rerun out.
_HELD: dict[str, RunLock] = {}


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown"
    return f"host {info.get('host', '?')}, PID {info.get('pid', '?')}, started {info.get('started', '?')}"


def acquire(run_dir: Path, warn=print) -> RunLock | None:
    """Take the lock or raise RunLockError at once (never waits). Returns None, after a warning, on a
    filesystem that does not support locks."""
    if run_dir.exists() and not run_dir.is_dir():  # mkdir(exist_ok=True) would say FileExistsError, errno EEXIST
        raise NotADirectoryError(errno.ENOTDIR, "is a file, not a directory", str(run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    path = (run_dir / LOCK_NAME).resolve()
    if str(path) in _HELD:
        return _HELD[str(path)]
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise RunLockError(
                f"run.dir {run_dir} is in use by another training ({_holder(path)}); wait for it to end or "
                "choose another run.dir"
            ) from None
        warn(
            f"warning: {path}: the filesystem refuses locks ({exc.strerror}); nothing prevents a second "
            "training from using this run.dir at the same time"
        )
        return None
    info = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(sys.argv),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    lock = _HELD[str(path)] = RunLock(path, fd)
    return lock
