"""A throwaway one-node SLURM cluster for the tests: munged, slurmctld and slurmd on this machine.

Everything lives in one temporary directory (config, munge key and socket, state, logs) and uses free
ports, so it touches no system-wide SLURM or munge set-up and several can run side by side. The daemons run
in the foreground as our children, so `stop()` ends exactly the processes `start()` began.

Debian's packages (`slurmctld slurmd slurm-client munge`, SLURM 22.05 on bookworm) are installed with
apt-get when missing and we are root (as in CI). `SlurmUnavailable` says why a cluster could not start.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue")


class SlurmUnavailable(RuntimeError):
    """The machine cannot run a local SLURM cluster (the message says what is missing)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_installed() -> None:
    """Install the Debian packages if a binary is missing (root only, quiet, non-interactive)."""
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in BINARIES):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable(f"SLURM binaries missing and cannot apt-get install {' '.join(PACKAGES)} (not root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise SlurmUnavailable(f"{' '.join(cmd)} failed ({done.returncode}): {' / '.join(tail)}")


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurm:
    """`with LocalSlurm() as slurm:` a running cluster; `slurm.env` is the environment its clients need."""

    def __init__(self, cpus: int | None = None) -> None:
        self.cpus = cpus or os.cpu_count() or 1
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: list = []
        self.dir = Path()
        self.env: dict[str, str] = {}

    # -- set-up ---------------------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> LocalSlurm:
        ensure_installed()
        # Not pytest's tmp_path: munged wants every directory above its socket to be searchable by all.
        self.dir = Path(tempfile.mkdtemp(prefix="gan-ddp-slurm-", dir="/tmp"))
        self.dir.chmod(0o755)
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        d = self.dir
        for sub in ("munge", "sock", "state", "spool"):
            (d / sub).mkdir()
        (d / "munge").chmod(0o700)
        (d / "sock").chmod(0o755)
        key = d / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = d / "sock" / "munge.socket"
        self._spawn(
            "munged",
            [
                _sbin("munged"),
                "--foreground",
                f"--socket={sock}",
                f"--key-file={key}",
                f"--log-file={d / 'munge' / 'munged.log'}",
                f"--pid-file={d / 'munge' / 'munged.pid'}",
                f"--seed-file={d / 'munge' / 'munged.seed'}",
            ],
        )
        self._wait(lambda: sock.exists(), timeout, "munged did not create its socket", "munge/munged.log")

        host = socket.gethostname().split(".")[0]
        conf = d / "slurm.conf"
        conf.write_text(
            "\n".join(
                [
                    "ClusterName=ganddptest",
                    f"SlurmctldHost={host}(127.0.0.1)",
                    f"SlurmctldPort={_free_port()}",
                    f"SlurmdPort={_free_port()}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={sock}",
                    f"StateSaveLocation={d / 'state'}",
                    f"SlurmdSpoolDir={d / 'spool'}",
                    f"SlurmctldPidFile={d / 'slurmctld.pid'}",
                    f"SlurmdPidFile={d / 'slurmd.pid'}",
                    f"SlurmctldLogFile={d / 'slurmctld.log'}",
                    f"SlurmdLogFile={d / 'slurmd.log'}",
                    # No cgroups (containers and CI runners rarely allow them): plain process tracking.
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobCompType=jobcomp/none",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "SchedulerType=sched/builtin",
                    # Keep finished jobs visible to `scontrol show job` for the assertions.
                    "MinJobAge=600",
                    f"NodeName={host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
                    f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        self.env = {**os.environ, "SLURM_CONF": str(conf)}
        self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", str(conf)])
        self._spawn("slurmd", [_sbin("slurmd"), "-D", "-f", str(conf)])
        self._wait(self._node_idle, timeout, "the node did not become idle", "slurmd.log")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.dir / f"{name}.stdout", "w")  # noqa: SIM115 - closed in stop()
        self.logs.append(log)
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env or None, start_new_session=True
        )

    def _wait(self, ready, timeout: float, what: str, log: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise SlurmUnavailable(f"{dead[0]} exited ({self.procs[dead[0]].returncode}): {self._tail(dead[0])}")
            if ready():
                return
            time.sleep(0.3)
        raise SlurmUnavailable(f"{what} within {timeout:.0f} s: {self._tail_file(log)}")

    def _node_idle(self) -> bool:
        out = self.run("sinfo", "--noheader", "--format=%T", check=False).stdout
        return "idle" in out

    # -- clients --------------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}")
        return done

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "--oneliner", job_id).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    # -- teardown -------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel every job, then end the daemons we started (slurmd first) and remove the directory."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", f"--user={pwd.getpwuid(os.getuid()).pw_name}", check=False)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self.run("squeue", "--noheader", check=False).stdout.strip():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        for log in self.logs:
            log.close()
        self.logs.clear()
        if self.dir != Path() and self.dir.exists() and not os.environ.get("GAN_DDP_KEEP_SLURM_DIR"):
            shutil.rmtree(self.dir, ignore_errors=True)

    def _tail(self, name: str) -> str:
        return self._tail_file(f"{name}.stdout")

    def _tail_file(self, name: str, lines: int = 3) -> str:
        path = self.dir / name
        text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
        return " / ".join(text[-lines:]) or f"(no {name})"

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
