"""launch/slurm.sbatch end to end on a real (throwaway, one-node) SLURM cluster: preemption before the time
limit, requeue, resume, completion, and no requeue of a job whose training has finished.

SLURM sends `--signal=B:USR1@T` to the batch shell T seconds before the time limit, at a moment its
scheduler picks (up to a minute early). To be fast and deterministic the test sends that same signal itself
with `scancel --signal=USR1 --batch` at the moments that matter; the job is still submitted with a time
limit and `--signal=B:USR1@...` as a user would.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
from _runs import REPO, SMOKE
from _slurm import FINAL, LocalSlurm, SlurmUnavailable
from _slurm import checkpoints as _checkpoints
from _slurm import wait as _wait

pytestmark = [pytest.mark.slurm, pytest.mark.multiprocess, pytest.mark.slow]

STEPS = 600  # smoke-model steps: attempt 1 is stopped early, attempt 2 trains the rest (~20 s on 2 cores)


@pytest.fixture(scope="module")
def slurm():
    try:
        cluster = LocalSlurm().start()
    except SlurmUnavailable as exc:
        pytest.skip(f"a local SLURM cluster cannot start here: {exc}")
    yield cluster
    cluster.stop()


def test_sbatch_preempts_requeues_resumes_and_does_not_requeue_a_finished_run(slurm, tmp_path, mnist_root):
    run = tmp_path / "run"
    log = tmp_path / "job.out"
    env = {
        **slurm.env,
        "PYTHON": sys.executable,
        "CONFIG": str(SMOKE),
        "GPUS_PER_NODE": "2",  # two gloo processes under torchrun (no GPU here)
        "OMP_NUM_THREADS": "1",
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "60",
        "PYTHONUNBUFFERED": "1",
    }
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    submit = [
        "sbatch",
        "--parsable",
        "--job-name=gan-ddp-test",
        "--nodes=1",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--time=00:10:00",
        "--signal=B:USR1@60",
        f"--output={log}",
        str(REPO / "launch" / "slurm.sbatch"),
        f"data.root={mnist_root}",
        "data.split=test",
        f"run.dir={run}",
        "log.wandb=disabled",
        "train.epochs=100",
        f"train.steps={STEPS}",
        "log.every=10",
        "log.sample_every=100",
        "checkpoint.every=50",
        "checkpoint.keep=100",
    ]
    done = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip().split(";")[0]

    # Attempt 1: once it has trained a little, the "time limit is near" signal.
    _wait("the first checkpoint", lambda: _checkpoints(run), log)
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    _wait("the requeue", lambda: int(slurm.job(job).get("Restarts", 0)) >= 1, log)
    text = log.read_text()
    stopped = re.search(r"stop requested by signal: checkpoint at step (\d+), exit 75", text)
    assert stopped, text[-4000:]
    preempted_at = int(stopped.group(1))
    assert 0 < preempted_at < STEPS
    assert preempted_at in _checkpoints(run)  # the preemption checkpoint itself
    assert f"preempted: requeueing job {job}" in text
    # SLURM holds a requeued job back for about two minutes (BeginTime; measured 147 s with 22.05):
    # release it now, as an administrator could, so the test does not sit idle.
    pending = _wait("the requeued job to be pending", lambda: slurm.job(job)["JobState"] == "PENDING", log)
    assert pending
    # slurmd revoked the first attempt's credential when it ended and refuses any credential of this job
    # created in that same second or earlier ("Job credential revoked", seen once here): let a second pass.
    time.sleep(2.5)
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")

    # Attempt 2 resumes there and finishes; the same signal arriving while it tears down must not requeue.
    _wait("the DONE marker", lambda: (run / "DONE").exists(), log, timeout=300)
    late = slurm.run("scancel", "--signal=USR1", "--batch", job, check=False)
    info = _wait("the end of the job", lambda: (lambda j: j if j["JobState"] in FINAL else None)(slurm.job(job)), log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[-4000:])
    assert info["Restarts"] == "1", text[-4000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{preempted_at:08d}'} (step {preempted_at})" in text
    assert "ended" in text and "done" in text
    if late.returncode == 0:  # the signal reached the job before it ended (the usual case)
        assert "SIGUSR1: time limit near" in text.split("preempted: requeueing")[1], text[-4000:]
        assert "not requeueing" in text
    assert (run / "DONE").read_text().strip() == f"step {STEPS}"
    assert not (run / "PREEMPTED").exists()
    assert not [w for w in ("FutureWarning", "DeprecationWarning", "UserWarning") if w in text], text[-4000:]

    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "duplicate or out-of-order steps in metrics.jsonl"
    assert steps[-1] == STEPS and steps[0] == 10
    assert steps == list(range(10, STEPS + 1, 10))
