"""Several machines for real: simulated hosts (network + UTS namespaces on a bridge, `tests/_slurm.py`), each
with its own hostname, address and slurmd, and the ranks SLURM or `accelerate launch` starts there.

- `sbatch --nodes=2 launch/slurm.sbatch` trains with world size nodes x processes per node, with the per-step
  losses of one node running the same world size;
- preemption across nodes (`--signal=B:USR1@N`): one stop step for every rank, one checkpoint, requeue, resume
  on another pair of nodes (the rendezvous moves), completion, metrics without duplicates;
- `accelerate launch --num_machines 2` with `launch/accelerate/multi_node.yaml`, one per simulated host.

Root only (CI); skipped, saying why, where namespaces or SLURM cannot start. The smoke model, OMP 1 thread.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _runs import REPO, SMOKE, base_env, losses_by_step, metric_lines, torchrun, train_cmd
from _slurm import FINAL, LocalSlurm, SlurmUnavailable, checkpoints, wait

from gan_ddp.runtime import compat

pytestmark = [pytest.mark.cluster, pytest.mark.slurm, pytest.mark.multiprocess, pytest.mark.slow]

# Naming the lost rank and host (the survivors check in through the rendezvous store) works from torch 2.1; on
# torch 2.0 (the K80 stack) rank 0 cannot reach its own store after the failed collective, so its one line says
# "cannot reach the rendezvous store" instead of naming the lost peer. Issue 21 runs the cluster tests on the
# default stack; the node-loss ones are left out on torch 2.0, saying why.
NAMES_LOST_PEERS = pytest.mark.skipif(
    compat.TORCH < "2.1",
    reason="torch 2.0: the lost peer is not named (rank 0 cannot reach its own rendezvous store after the failed "
    "collective); node-loss tests run on the default stack",
)

NODES = 3  # jobs take 2, so a requeued job can land on another pair


@pytest.fixture(scope="module")
def cluster():
    try:
        # a node whose slurmd stops answering is DOWN after 10 s (default 300): the node-loss tests wait for it
        slurm = LocalSlurm(cpus=2, nodes=NODES, slurmd_timeout=10).start()
    except SlurmUnavailable as exc:
        pytest.skip(f"a simulated multi-node SLURM cluster cannot start here: {exc}")
    try:
        yield slurm
    finally:
        slurm.stop()


def _job_env(slurm: LocalSlurm, per_node: int, **extra: str) -> dict[str, str]:
    env = {
        **slurm.env,
        "PYTHON": sys.executable,
        # the jobs run this checkout's gan_ddp, whatever is installed in the interpreter
        "PYTHONPATH": ":".join(p for p in (str(REPO), slurm.env.get("PYTHONPATH", "")) if p),
        "CONFIG": str(SMOKE),
        "GPUS_PER_NODE": str(per_node),  # gloo processes per node under torchrun (no GPU here)
        "OMP_NUM_THREADS": "1",
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "60",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _sbatch(slurm: LocalSlurm, env: dict[str, str], log: Path, options: list[str], overrides: list[str]) -> str:
    cmd = ["sbatch", "--parsable", f"--output={log}", *options, str(REPO / "launch" / "slurm.sbatch"), *overrides]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def _finished(slurm: LocalSlurm, job: str, log: Path, timeout: float = 240) -> dict[str, str]:
    return wait(
        "the end of the job", lambda: (lambda j: j if j["JobState"] in FINAL else None)(slurm.job(job)), log, timeout
    )


def _run_overrides(run: Path, *extra: str) -> list[str]:
    # data, run.dir, W&B off (train_cmd without "train --config FILE"); one thread per process, as OMP
    return [*train_cmd(run)[3:], "train.threads=1", *extra]


def _node_loss_overrides(run: Path, steps: int, collective_timeout_s: float) -> list[str]:
    """A run that loses a node: a checkpoint and a metrics line every 5 steps, all checkpoints kept (the resume
    point is the newest before the loss), no grids until the end."""
    return _run_overrides(
        run,
        f"train.steps={steps}",
        "log.every=5",
        "log.sample_every=1000",
        "checkpoint.every=5",
        "checkpoint.keep=100",
        f"train.collective_timeout_s={collective_timeout_s:g}",
    )


def test_two_nodes_train_as_one_world_with_the_losses_of_one_node(cluster, tmp_path):
    """2 nodes x 2 processes: world size 4, and the per-step losses of 4 processes on one node."""
    run, log = tmp_path / "nodes", tmp_path / "job.out"
    overrides = ["train.steps=20", "log.every=1", "checkpoint.every=10"]
    job = _sbatch(
        cluster,
        _job_env(cluster, per_node=2),
        log,
        ["--job-name=gdtest-2x2", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=00:05:00"],
        _run_overrides(run, *overrides),
    )
    info = _finished(cluster, job, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[-4000:])
    hosts = cluster.run("scontrol", "show", "hostnames", info["NodeList"]).stdout.split()
    assert len(hosts) == 2 and set(hosts) <= set(cluster.hosts.names), info["NodeList"]
    assert "gan-ddp: 4 process(es) on cpu" in text, text[-4000:]
    assert {m["world_size"] for m in metric_lines(run)} == {4}
    # one torchrun per node with two processes each, world size 4: two ranks on each of the two hosts
    assert f"c10d rendezvous at {hosts[0]}:" in text, text[-4000:]
    assert sorted(p.name for p in (run / "checkpoints" / "step_00000020").glob("rng_*.json")) == [
        f"rng_{r}.json" for r in range(4)
    ]

    # The same world size on one node (torchrun, 4 processes on this machine): the same losses per step.
    one = torchrun(4, train_cmd(tmp_path / "one", *overrides))
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    a, b = losses_by_step(run), losses_by_step(tmp_path / "one")
    assert a.keys() == b.keys() and len(a) == 20
    largest = max(abs(x - y) for step in a for x, y in zip(a[step], b[step], strict=True))
    print(f"\n2 nodes x 2 processes vs 1 node x 4 processes: largest per-step loss/score difference {largest:.3g}")
    assert largest <= 1e-5, largest


def test_preemption_across_nodes_requeues_and_resumes_on_other_nodes(cluster, tmp_path):
    steps = 120
    run, log = tmp_path / "run", tmp_path / "job.out"
    n1, n2, n3 = cluster.hosts.names
    job = _sbatch(
        cluster,
        _job_env(cluster, per_node=1),
        log,
        [
            "--job-name=gdtest-preempt",
            "--nodes=2",
            f"--exclude={n3}",  # attempt 1 on n1 + n2
            "--gpus-per-node=0",
            "--cpus-per-task=1",
            "--time=00:10:00",
            "--signal=B:USR1@60",
        ],
        _run_overrides(
            run,
            "train.epochs=100",
            f"train.steps={steps}",
            "log.every=10",
            "checkpoint.every=50",
            "checkpoint.keep=100",
        ),
    )
    wait("the first checkpoint", lambda: checkpoints(run), log)
    first_nodes = cluster.job(job)["NodeList"]
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    wait("the requeue", lambda: int(cluster.job(job).get("Restarts", 0)) >= 1, log)
    text = log.read_text()
    stops = re.findall(r"stop requested by signal: checkpoint at step (\d+), exit 75", text)
    assert len(set(stops)) == 1, text[-4000:]  # one stop step for every rank on every node
    at = int(stops[0])
    assert 0 < at < steps and at in checkpoints(run)
    # every rank wrote its part of that one checkpoint
    assert sorted(p.name for p in (run / "checkpoints" / f"step_{at:08d}").glob("rng_*.json")) == [
        "rng_0.json",
        "rng_1.json",
    ]
    assert f"preempted: requeueing job {job}" in text
    wait("the requeued job to be pending", lambda: cluster.job(job)["JobState"] == "PENDING", log)
    # The next allocation gets other nodes: n2 (rank 1's node before) now holds the rendezvous.
    cluster.run("scontrol", "update", f"JobId={job}", f"ExcNodeList={n1}")
    time.sleep(2.5)  # slurmd revokes the old credential with 1 s granularity (see test_slurm)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")

    info = _finished(cluster, job, log, timeout=300)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[-4000:])
    assert info["Restarts"] == "1"
    second = cluster.run("scontrol", "show", "hostnames", info["NodeList"]).stdout.split()
    assert second == [n2, n3], (first_nodes, info["NodeList"])
    assert f"c10d rendezvous at {n2}:" in text.split("preempted: requeueing")[1]
    assert f"resumed from {run / 'checkpoints' / f'step_{at:08d}'} (step {at})" in text
    assert (run / "DONE").read_text().strip() == f"step {steps}"
    lines = metric_lines(run)
    assert [m["step"] for m in lines] == list(range(10, steps + 1, 10))  # no duplicate, none missing
    assert {m["world_size"] for m in lines} == {2}


def test_accelerate_launch_on_two_machines(cluster, tmp_path):
    """The card's first usage: one `accelerate launch` per machine, the YAML in launch/accelerate/, the
    machine rank and the first machine's address on the command line."""
    run = tmp_path / "run"
    port = "29533"
    procs, logs = [], []
    env = base_env(ACCELERATE_USE_CPU="true", PYTHONPATH=str(REPO))
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    for rank in range(2):
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(REPO / "launch" / "accelerate" / "multi_node.yaml"),
            "--num_processes",
            "2",  # in all: one per machine here
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            cluster.hosts.addrs[0],
            "--main_process_port",
            port,
            "--mixed_precision",
            "no",
            "-m",
            "gan_ddp",
            *train_cmd(run, "train.steps=10", "log.every=1"),
        ]
        logs.append(open(tmp_path / f"machine{rank}.out", "w"))  # noqa: SIM115 - closed below
        procs.append(
            subprocess.Popen(
                cluster.hosts.wrap(rank, cmd), cwd=REPO, env=env, stdout=logs[-1], stderr=subprocess.STDOUT
            )
        )
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.5)
    finally:
        codes = [p.poll() for p in procs]  # None: still running at the deadline (a hang), killed below
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    out = [(tmp_path / f"machine{r}.out").read_text() for r in range(2)]
    assert codes == [0, 0], f"exit codes {codes}\n" + "\n---\n".join(o[-3000:] for o in out)
    assert "gan-ddp: 2 process(es) on cpu" in out[0]
    lines = metric_lines(run)
    assert [m["step"] for m in lines] == list(range(1, 11)) and {m["world_size"] for m in lines} == {2}
    # the same losses as one machine with two processes
    one = torchrun(2, train_cmd(tmp_path / "one", "train.steps=10", "log.every=1"))
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = losses_by_step(run), losses_by_step(tmp_path / "one")
    assert max(abs(x - y) for s in a for x, y in zip(a[s], b[s], strict=True)) <= 1e-5
    assert json.loads(json.dumps(lines[-1]))["step"] == 10


@NAMES_LOST_PEERS
def test_a_lost_node_stops_the_others_with_one_line_and_the_next_allocation_resumes(cluster, tmp_path):
    """Node 2 drops off the network mid-run (its link down). The rank on node 1 stops after
    train.collective_timeout_s with one line naming the rank and host it lost; SLURM marks the node DOWN, ends the
    job (NODE_FAIL) and requeues it (--requeue); the next allocation (nodes 1 and 3) resumes from the newest
    checkpoint and finishes."""
    timeout, steps = 15, 100
    run, log = tmp_path / "run", tmp_path / "job.out"
    n1, n2, n3 = cluster.hosts.names
    job = _sbatch(
        cluster,
        _job_env(cluster, per_node=1),
        log,
        ["--job-name=gdtest-lost", "--nodes=2", f"--exclude={n3}", "--gpus-per-node=0", "--cpus-per-task=1"],
        _node_loss_overrides(run, steps, timeout),
    )
    try:
        wait("the first checkpoint", lambda: checkpoints(run), log)
        cluster.hosts.link(1, up=False)  # n2 is gone for everyone else
        t0 = time.monotonic()
        line = wait("the error line", lambda: re.search(r"error: .*", log.read_text()), log, timeout=timeout + 90)
        waited = time.monotonic() - t0
        print(f"\nlink of {n2} down -> '{line.group(0)}' after {waited:.1f} s")
        assert f"timed out after {timeout:g} s (train.collective_timeout_s): rank 1 on {n2} did not answer" in (
            line.group(0)
        )
        assert waited < timeout + 10 + 30  # the timeout, the 10 s the check-in waits, slack for this machine
        newest = max(checkpoints(run))
        wait("the requeue", lambda: int(cluster.job(job).get("Restarts", 0)) >= 1, log, timeout=120)
        wait("the requeued job to be pending", lambda: cluster.job(job)["JobState"] == "PENDING", log)
        assert cluster.node_states()[n2].startswith("down"), cluster.node_states()
        # it was submitted with --exclude=n3 (to start on n1 + n2): let it have n3 now
        cluster.run("scontrol", "update", f"JobId={job}", f"ExcNodeList={n2}")
        time.sleep(2.5)
        cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
        info = _finished(cluster, job, log, timeout=300)
    finally:
        cluster.restart_node(1)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[-4000:])
    # Who requeues is a race on a loaded machine: the batch script on n1 after the trainer's line ("lost a node or
    # process ... requeueing"), or slurmctld itself (NODE_FAIL with --requeue) when it marks n2 down first and ends
    # the batch script before it prints. Either way the job was requeued (waited for above) exactly once.
    assert int(info.get("Restarts", 0)) == 1, info
    if "lost a node or process: step" in text:  # the script says it requeues, unless slurmctld's requeue ended it first
        assert f"requeueing job {job}" in text or "SIGTERM: job cancelled" in text, text[-4000:]
    assert cluster.run("scontrol", "show", "hostnames", info["NodeList"]).stdout.split() == [n1, n3]
    assert f"resumed from {run / 'checkpoints' / f'step_{newest:08d}'} (step {newest})" in text
    assert (run / "DONE").read_text().strip() == f"step {steps}"
    steps_logged = [m["step"] for m in metric_lines(run)]
    assert steps_logged == list(range(5, steps + 1, 5))
    # one line from the trainer (srun and slurmstepd add their own "...: error:" lines): the cut-off rank's
    # line cannot reach the job log, but its LOST marker reached the shared run.dir, and says what it saw
    assert len(re.findall(r"^error: ", text, re.M)) == 1, text[-4000:]


@NAMES_LOST_PEERS
def test_elastic_torchrun_carries_on_without_a_lost_node(cluster, tmp_path):
    """NNODES=1:2 MAX_RESTARTS=1 and `sbatch --no-kill`: node 2 dies (every process on it, slurmd included).
    The rank on node 1 fails with the line naming the node, its torchrun restarts the worker at a new rendezvous
    of the nodes left, which resumes from the newest checkpoint with the same global batch on one process and
    finishes, without a new submission."""
    steps = 60
    run, log = tmp_path / "run", tmp_path / "job.out"
    _, n2, n3 = cluster.hosts.names
    env = _job_env(cluster, per_node=1, NNODES="1:2", MAX_RESTARTS="1", RDZV_CONF="last_call_timeout=3")
    job = _sbatch(
        cluster,
        env,
        log,
        [
            "--job-name=gdtest-elastic",
            "--nodes=2",
            f"--exclude={n3}",
            "--no-kill",
            "--gpus-per-node=0",
            "--cpus-per-task=1",
        ],
        _node_loss_overrides(run, steps, collective_timeout_s=30),
    )
    try:
        wait("the first checkpoint", lambda: checkpoints(run), log)
        cluster.hosts.kill(1)
        info = _finished(cluster, job, log, timeout=300)
    finally:
        cluster.restart_node(1)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[-4000:])
    assert info["Restarts"] == "0"  # no requeue: torchrun restarted the workers within the job
    lost = re.search(r"error: .*", text)
    assert lost and n2 in lost.group(0), text[-4000:]
    resumed = re.search(r"resumed from \S+ \(step (\d+)\)", text)
    assert resumed and "saved by 2 process(es), resuming with 1" in text, text[-4000:]
    world = {m["step"]: m["world_size"] for m in metric_lines(run)}
    assert sorted(world) == list(range(5, steps + 1, 5))
    assert {w for s, w in world.items() if s > int(resumed.group(1))} == {1}
    assert (run / "DONE").read_text().strip() == f"step {steps}"
