"""A throwaway SLURM cluster for the tests: munged, slurmctld and one slurmd per node.

`LocalSlurm()` is one node, this machine itself. `LocalSlurm(nodes=3)` simulates three hosts
(`SimulatedHosts`): each node is a network namespace on a bridge with its own address on a private /24 and,
for its slurmd and everything SLURM starts there (srun's tasks, torchrun, the ranks), its own hostname (UTS
namespace) and an /etc/hosts naming every node. munged and slurmctld run beside them on this machine, reached
over the bridge (munge through its socket file). Root only (CI runs as root).

Everything lives in one temporary directory (config, munge key and socket, state, logs) and uses free
ports, so it touches no system-wide SLURM or munge set-up and several can run side by side. The daemons run
in the foreground as our children, so `stop()` ends exactly the processes `start()` began; namespaces,
bridge and veth pairs carry the prefix `gdtest-` and a per-cluster id, and a cluster left behind by a
crashed run (its owner process gone) is removed by the next one that starts.

Debian's packages (`slurmctld slurmd slurm-client munge`, SLURM 22.05 on bookworm) are installed with
apt-get when missing and we are root (as in CI). `SlurmUnavailable` says why a cluster could not start.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
# Job states after which a job runs no more (`scontrol show job`'s JobState).
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
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


# -- simulated hosts ----------------------------------------------------------------------------------------
PREFIX = "gdtest-"  # every namespace and link the tests create starts with it
REGISTRY = Path("/run/gdtest")  # one file per live set of simulated hosts: its id, holding the owner's pid


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise SlurmUnavailable(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_hosts(cid: str) -> None:
    """Kill what runs in cluster `cid`'s namespaces, delete them, their links and the bridge (idempotent)."""
    names = [n.split()[0] for n in _ip("netns", "list", check=False).stdout.splitlines() if n.strip()]
    for ns in (n for n in names if n.startswith(f"{PREFIX}{cid}-")):
        pids = _ip("netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pids and time.monotonic() < deadline and _ip("netns", "pids", ns, check=False).stdout.split():
            time.sleep(0.1)
        _ip("netns", "del", ns, check=False)
        shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
    links = _ip("-o", "link", "show", check=False).stdout.splitlines()
    for line in links:
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(f"{PREFIX}{cid}"):
            _ip("link", "del", name, check=False)
    (REGISTRY / cid).unlink(missing_ok=True)


def _kill_daemons_of(workdir: str) -> None:
    """SIGKILL the daemons whose command line names `workdir` (slurmctld, munged of a crashed cluster)."""
    if not workdir.startswith("/tmp/gan-ddp-slurm-"):
        return
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if workdir in cmdline and int(proc.name) != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


def remove_stale_hosts() -> None:
    """Remove simulated hosts whose owner process has died (a crashed or killed test run): what runs in
    their namespaces, the namespaces, links, bridge, and the slurmctld and munged beside them."""
    for entry in REGISTRY.glob("*") if REGISTRY.exists() else []:
        try:
            owner, _, workdir = entry.read_text().partition("\n")
            owner = int(owner.strip() or 0)
        except (OSError, ValueError):
            owner, workdir = 0, ""
        if not owner or not _alive(owner):
            _kill_daemons_of(workdir.strip())
            _remove_hosts(entry.name)
    # Namespaces or links of ours with no registry entry at all (killed between creating and registering).
    listed = {e.name for e in REGISTRY.glob("*")} if REGISTRY.exists() else set()
    names = [n.split()[0] for n in _ip("netns", "list", check=False).stdout.splitlines() if n.strip()]
    links = [
        ln.split(":")[1].strip().split("@")[0] for ln in _ip("-o", "link", "show", check=False).stdout.splitlines()
    ]
    for name in names + links:
        if (
            name.startswith(PREFIX)
            and len(name) >= len(PREFIX) + 4
            and name[len(PREFIX) : len(PREFIX) + 4] not in listed
        ):
            _remove_hosts(name[len(PREFIX) : len(PREFIX) + 4])


class SimulatedHosts:
    """N simulated hosts: network namespaces `gdtest-<id>-n<k>` on the bridge `gdtest-<id>br`, each at
    10.213.<s>.<10+k>/24 with veth `gdtest-<id>v<k>` on the bridge side; this machine is 10.213.<s>.1.
    Host names are `gdtest-n<k>`; `hosts_file` lists them all (bind-mounted over /etc/hosts in `wrap`)."""

    def __init__(self, n: int, workdir: Path) -> None:
        self.n = n
        self.id = secrets.token_hex(2)
        self.subnet = 1 + int(self.id, 16) % 250
        self.names = [f"{PREFIX}n{k}" for k in range(1, n + 1)]
        self.addrs = [f"10.213.{self.subnet}.{10 + k}" for k in range(1, n + 1)]
        self.gateway = f"10.213.{self.subnet}.1"
        self.bridge = f"{PREFIX}{self.id}br"
        self.hosts_file = workdir / "hosts"

    def netns(self, k: int) -> str:
        return f"{PREFIX}{self.id}-n{k + 1}"

    def veth(self, k: int) -> str:
        return f"{PREFIX}{self.id}v{k + 1}"

    def start(self) -> SimulatedHosts:
        if os.geteuid() != 0:
            raise SlurmUnavailable("simulated hosts need root (network namespaces, a bridge, veth pairs)")
        for tool in ("ip", "nsenter", "unshare", "mount"):
            if not shutil.which(tool):
                raise SlurmUnavailable(f"simulated hosts need `{tool}`, which is not installed")
        remove_stale_hosts()
        REGISTRY.mkdir(parents=True, exist_ok=True)
        (REGISTRY / self.id).write_text(f"{os.getpid()}\n{self.hosts_file.parent}")
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for k in range(self.n):
                ns, veth = self.netns(k), self.veth(k)
                _ip("netns", "add", ns)
                _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("link", "set", veth, "master", self.bridge)
                _ip("link", "set", veth, "up")
                _ip("-n", ns, "addr", "add", f"{self.addrs[k]}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.stop()
            raise
        lines = ["127.0.0.1 localhost", f"{self.gateway} {socket.gethostname().split('.')[0]}"]
        lines += [f"{a} {h}" for a, h in zip(self.addrs, self.names, strict=True)]
        self.hosts_file.write_text("\n".join(lines) + "\n")
        return self

    def wrap(self, k: int, cmd: list[str]) -> list[str]:
        """`cmd` as it runs on node k: in its network namespace, with its hostname and /etc/hosts.

        Not `ip netns exec`: that mounts a fresh /sys, where slurmd finds no cgroup file system and exits,
        and it lays /etc/netns/NAME/hosts over /etc/hosts. A private mount namespace (unshare --mount) keeps
        the bind mount of the hosts file to this node."""
        quoted = " ".join(_sh_quote(c) for c in cmd)
        script = (
            f"hostname {self.names[k]} && mount --bind {_sh_quote(str(self.hosts_file))} /etc/hosts && exec {quoted}"
        )
        return ["nsenter", f"--net=/var/run/netns/{self.netns(k)}", "unshare", "--uts", "--mount", "sh", "-c", script]

    def link(self, k: int, up: bool) -> None:
        """Cut node k off the network (its veth down) or connect it again."""
        _ip("link", "set", self.veth(k), "up" if up else "down")

    def pids(self, k: int) -> list[int]:
        return [int(p) for p in _ip("netns", "pids", self.netns(k), check=False).stdout.split()]

    def kill(self, k: int) -> None:
        """Node k dies: every process in its namespace gets SIGKILL."""
        for pid in self.pids(k):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def shape(self, rate: str | None) -> None:
        """Limit every node's link (both directions through the bridge side) with tbf, or lift the limit."""
        for k in range(self.n):
            for dev, ns in ((self.veth(k), None), ("eth0", self.netns(k))):
                pre = ["tc", "-n", ns] if ns else ["tc"]
                subprocess.run([*pre, "qdisc", "del", "dev", dev, "root"], capture_output=True, timeout=30)
                if rate:
                    cmd = [*pre, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate]
                    # burst: 1 ms at that rate (a smaller bucket needs more timer wake-ups than a loaded
                    # 2-core machine gives, and throttles far below the rate)
                    burst = f"{max(_bits(rate) // 8 // 1000, 16 * 1024)}b"
                    done = subprocess.run(
                        [*cmd, "burst", burst, "latency", "50ms"], capture_output=True, text=True, timeout=30
                    )
                    if done.returncode != 0:
                        raise SlurmUnavailable(f"tc tbf on {dev} failed: {done.stderr.strip()}")

    def stop(self) -> None:
        _remove_hosts(self.id)


def _bits(rate: str) -> int:
    """ "10gbit" -> 10**10 bits per second (tc's decimal units)."""
    units = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "bit": 1}
    for unit, factor in units.items():
        if rate.lower().endswith(unit):
            return int(float(rate[: -len(unit)]) * factor)
    raise ValueError(f"rate {rate!r}: use kbit, mbit or gbit")


def _sh_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurm:
    """`with LocalSlurm() as slurm:` a running cluster; `slurm.env` is the environment its clients need.

    `nodes=0`: one node, this machine. `nodes=N`: N simulated hosts (`slurm.hosts`), node names
    `gdtest-n1` ... `gdtest-nN`, each with `cpus` CPUs."""

    def __init__(self, cpus: int | None = None, nodes: int = 0, slurmd_timeout: int = 300) -> None:
        self.cpus = cpus or os.cpu_count() or 1
        self.nodes = nodes
        self.slurmd_timeout = slurmd_timeout
        self.hosts: SimulatedHosts | None = None
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
        ctld_addr, spool, pid, log = "127.0.0.1", d / "spool", d / "slurmd.pid", d / "slurmd.log"
        nodes = [f"NodeName={host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN"]
        names = [host]
        if self.nodes:
            self.hosts = SimulatedHosts(self.nodes, d).start()
            ctld_addr = self.hosts.gateway
            # %n: the node's name, so each slurmd keeps its own spool, pid file and log
            spool, pid, log = d / "spool" / "%n", d / "slurmd-%n.pid", d / "slurmd-%n.log"
            names = self.hosts.names
            nodes = [
                f"NodeName={n} NodeAddr={a} CPUs={self.cpus} State=UNKNOWN"
                for n, a in zip(self.hosts.names, self.hosts.addrs, strict=True)
            ]
        conf = d / "slurm.conf"
        conf.write_text(
            "\n".join(
                [
                    "ClusterName=ganddptest",
                    f"SlurmctldHost={host}({ctld_addr})",
                    f"SlurmctldPort={_free_port()}",
                    f"SlurmdPort={_free_port()}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={sock}",
                    f"StateSaveLocation={d / 'state'}",
                    f"SlurmdSpoolDir={spool}",
                    f"SlurmctldPidFile={d / 'slurmctld.pid'}",
                    f"SlurmdPidFile={pid}",
                    f"SlurmctldLogFile={d / 'slurmctld.log'}",
                    f"SlurmdLogFile={log}",
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
                    # A node whose slurmd stops answering is DOWN after this many seconds (default 300).
                    f"SlurmdTimeout={self.slurmd_timeout}",
                    *nodes,
                    f"PartitionName=test Nodes={','.join(names)} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        self.env = {**os.environ, "SLURM_CONF": str(conf)}
        self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", str(conf)])
        if self.hosts is None:
            self._spawn("slurmd", [_sbin("slurmd"), "-D", "-f", str(conf)])
            self._wait(self._node_idle, timeout, "the node did not become idle", "slurmd.log")
            return
        for k, name in enumerate(self.hosts.names):
            self._spawn(f"slurmd-{name}", self.hosts.wrap(k, [_sbin("slurmd"), "-D", "-N", name, "-f", str(conf)]))
        self._wait(self._node_idle, timeout, "the nodes did not become idle", f"slurmd-{self.hosts.names[-1]}.log")

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
        out = self.run("sinfo", "--noheader", "--Node", "--format=%T", check=False).stdout.split()
        return out.count("idle") == max(1, self.nodes)

    def restart_node(self, k: int) -> None:
        """Bring simulated node k back after `hosts.kill(k)` or `hosts.link(k, False)`: link up, a new slurmd
        if its own died (ReturnToService=2 lets it rejoin), and wait until SLURM sees every node idle."""
        assert self.hosts is not None
        self.hosts.link(k, True)
        name = self.hosts.names[k]
        if self.procs[f"slurmd-{name}"].poll() is not None:
            conf = self.env["SLURM_CONF"]
            self._spawn(f"slurmd-{name}", self.hosts.wrap(k, [_sbin("slurmd"), "-D", "-N", name, "-f", conf]))
        self.run("scontrol", "update", f"NodeName={name}", "State=RESUME", check=False)
        self._wait(self._node_idle, 90, f"{name} did not come back", f"slurmd-{name}.log")

    def node_states(self) -> dict[str, str]:
        out = self.run("sinfo", "--noheader", "--Node", "--format=%N %T", check=False).stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

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
        slurmds = [n for n in self.procs if n.startswith("slurmd")]
        for name in (*slurmds, "slurmctld", "munged"):
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
        if self.hosts is not None:  # what is left in the namespaces (a killed node's orphans), then the network
            self.hosts.stop()
            self.hosts = None
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


# -- test helpers ---------------------------------------------------------------------------------------------
def wait(what: str, ready, log: Path, timeout: float = 240):
    """Poll `ready()` until it returns something true and return that; fail the test with the job log's tail."""
    import pytest

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = ready()
        if value:
            return value
        time.sleep(0.1)
    text = log.read_text(errors="replace") if log.exists() else "(no job log)"
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n--- job log ---\n{text[-6000:]}", pytrace=False)


def checkpoints(run: Path) -> list[int]:
    """Steps of the complete checkpoints in a run directory."""
    return sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
