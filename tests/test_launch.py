"""launch/run.sh, the one launcher: what it chooses for N, 1 or no GPUs (decided with a stand-in nvidia-smi,
shown with DRY_RUN=1), a real run on this machine, and preemption through it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _runs import REPO, SMOKE, newest_checkpoint

RUN_SH = REPO / "launch" / "run.sh"


def _env(tmp_path: Path, gpus: int | None, **extra: str) -> dict[str, str]:
    """Environment where `nvidia-smi -L` lists `gpus` GPUs (None: no nvidia-smi answers, exit 9 as without
    a driver). GPU selection variables of the calling shell are dropped unless given in `extra`."""
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    lines = "".join(f'echo "GPU {i}: NVIDIA A100-SXM4-80GB (UUID: GPU-{i})"\n' for i in range(gpus or 0))
    (stub / "nvidia-smi").write_text("#!/bin/sh\n" + (lines if gpus is not None else "exit 9\n"))
    (stub / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "NGPUS", "WORLD_SIZE", "RANK")}
    env.update(PATH=f"{stub}{os.pathsep}{env['PATH']}", PYTHON=sys.executable, PYTHONUNBUFFERED="1", **extra)
    return env


def _dry(tmp_path: Path, gpus: int | None, *args: str, **extra: str) -> subprocess.CompletedProcess:
    env = _env(tmp_path, gpus, DRY_RUN="1", **extra)
    return subprocess.run(["bash", str(RUN_SH), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


ARGS = ("--config", "configs/mnist_mlp.yaml", "run.dir=runs/x", "train.steps=5")


@pytest.mark.parametrize(
    ("gpus", "extra", "chosen", "command"),
    [
        (4, {}, "4 GPU(s) per nvidia-smi -L -> 4 GPUs: accelerate launch --multi_gpu",
         "-m accelerate.commands.launch --multi_gpu --num_processes 4 --num_machines 1"),
        (1, {}, "1 GPU(s) per nvidia-smi -L -> 1 GPU: the trainer directly", f"{sys.executable} -m gan_ddp train"),
        (0, {}, "0 GPUs per nvidia-smi -L -> CPU: 1 process", f"{sys.executable} -m gan_ddp train"),
        (None, {}, "0 GPUs per nvidia-smi -L -> CPU: 1 process", f"{sys.executable} -m gan_ddp train"),
        (4, {"CUDA_VISIBLE_DEVICES": "2,3"}, "2 GPU(s) per CUDA_VISIBLE_DEVICES='2,3' -> 2 GPUs: accelerate",
         "--multi_gpu --num_processes 2"),
        (4, {"CUDA_VISIBLE_DEVICES": ""}, "0 GPUs per CUDA_VISIBLE_DEVICES='' -> CPU: 1 process",
         f"{sys.executable} -m gan_ddp train"),
        (0, {"NGPUS": "8"}, "8 GPU(s) per NGPUS=8 -> 8 GPUs", "--multi_gpu --num_processes 8"),
    ],
)  # fmt: skip
def test_choice_by_gpus_seen(tmp_path, gpus, extra, chosen, command):
    out = _dry(tmp_path, gpus, *ARGS, **extra)
    assert out.returncode == 0, out.stderr
    assert f"[run] {chosen}" in out.stderr
    ran = out.stderr.split("[launch] would run: ")[1].strip()
    assert command in ran
    # the arguments reach the trainer unchanged, after `-m gan_ddp train`
    assert ran.split(" -m gan_ddp train ")[1].split() == list(ARGS)


def test_precision_and_bad_gpu_count(tmp_path):
    out = _dry(tmp_path, 2, *ARGS, PRECISION="fp16")
    assert "--mixed_precision fp16" in out.stderr and out.stderr.rstrip().endswith("train.precision=fp16")
    bad = _dry(tmp_path, 2, *ARGS, NGPUS="two")
    assert bad.returncode == 2
    assert "error: launch/run.sh: NGPUS must be a whole number of GPUs (got 'two')" in bad.stderr


def _overrides(run: Path, mnist_root: Path, *more: str) -> list[str]:
    return ["--config", str(SMOKE), f"data.root={mnist_root}", f"run.dir={run}", "log.wandb=disabled", *more]


@pytest.mark.slow
def test_runs_the_smoke_config_on_this_machine(tmp_path, mnist_root):
    """No stand-ins: the machine's own GPUs decide (none on the CPU machines: one process, all cores)."""
    run = tmp_path / "run"
    # OMP_NUM_THREADS: the suite's one thread per process (conftest); coreutils' nproc would report it as the cores.
    scrubbed = ("WORLD_SIZE", "RANK", "NGPUS", "DRY_RUN", "OMP_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if k not in scrubbed}
    env.update(PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    out = subprocess.run(
        ["bash", str(RUN_SH), *_overrides(run, mnist_root)], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    gpus = torch.cuda.device_count()
    if gpus == 0:
        assert f"-> CPU: 1 process x {os.cpu_count()} cores" in out.stderr
        assert "gan-ddp: 1 process(es) on cpu" in out.stdout
    else:
        assert f"[run] {gpus} GPU(s)" in out.stderr
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 20 and (run / "DONE").exists()


@pytest.mark.slow
def test_sigterm_to_the_launcher_checkpoints_and_exits_75(tmp_path, mnist_root):
    run = tmp_path / "run"
    env = _env(tmp_path, 0)
    args = _overrides(run, mnist_root, "train.epochs=1000", "train.steps=null", "log.every=1")
    proc = subprocess.Popen(["bash", str(RUN_SH), *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stdout[-2000:] + stderr[-2000:]
    assert "[launch] SIGTERM: asking the training processes to checkpoint" in stderr
    assert (run / "PREEMPTED").exists() and not (run / "DONE").exists()
    assert newest_checkpoint(run).name.startswith("step_")


@pytest.mark.multiprocess
def test_two_cpu_multiproc_runs_at_once_each_have_their_own_rendezvous(tmp_path):
    """launch/cpu_multiproc.sh twice on one machine, the second started once the first has rendezvoused and
    outliving it. With torch 2.0's `--standalone` (fixed port 29400) the second joined the first's store and
    failed when the first ended ("Broken pipe"); each needs its own free port."""
    script = REPO / "launch" / "cpu_multiproc.sh"
    env = _env(tmp_path, None, NPROC="2", OMP_NUM_THREADS="1")
    common = ["--config", str(SMOKE), "data.root=bundled", "data.split=test", "log.wandb=disabled", "log.every=1"]

    def start(name: str, steps: int) -> subprocess.Popen:
        log = (tmp_path / f"{name}.log").open("w")
        args = [*common, f"run.dir={tmp_path / name}", f"train.steps={steps}"]
        return subprocess.Popen(["bash", str(script), *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    first = start("first", 6)
    deadline = time.monotonic() + 120
    while "process(es) on cpu" not in (tmp_path / "first.log").read_text():  # rendezvous done, store bound
        assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.2)
    second = start("second", 60)
    assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert second.poll() is None, "the second run ended before the first: the test proves nothing"
    assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()[-3000:]
    for name, steps in (("first", 6), ("second", 60)):
        metrics = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert metrics[-1]["step"] == steps and {m["world_size"] for m in metrics if "world_size" in m} == {2}
