"""The fault matrix (docs/faults.md): every fault ends with one `error:` line and a documented exit code,
and loses nothing a rerun needs. Divergence, a second trainer on one run.dir, I/O errors, checkpoint files
that fail safe loading, Ctrl-C, stalled and dead processes, bad floats in the config."""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from _runs import (
    ONE_MACHINE,
    REPO,
    base_env,
    metric_lines,
    newest_checkpoint,
    single,
    torchrun,
    torchrun_cmd,
    train_cmd,
    train_inproc,
)
from safetensors.torch import load_file, save_file

from gan_ddp.config import ConfigError, load_config
from gan_ddp.runtime import checkpoint as ckpt
from gan_ddp.runtime import faults
from gan_ddp.runtime.faults import SECOND_INTERRUPT_AFTER_S
from gan_ddp.training.step import GanStep
from gan_ddp.training.stop import StopRequest

LONG = ("train.epochs=1000", "train.steps=null", "log.every=1")


def cli_inproc(args: list[str], capsys) -> tuple[int, str, str]:
    """`gan-ddp ARGS` in this process (Accelerate's singletons reset first); (exit code, stdout, stderr)."""
    from accelerate.state import AcceleratorState, GradientState

    from gan_ddp.commands.cli import main

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    capsys.readouterr()
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    assert "Traceback" not in stderr
    return lines[0]


def strict_lines(run: Path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON: bare NaN/Infinity tokens fail."""

    def refuse(token: str):
        raise ValueError(f"non-JSON token {token}")

    return [json.loads(line, parse_constant=refuse) for line in (run / "metrics.jsonl").read_text().splitlines()]


def all_finite(checkpoint: Path) -> bool:
    tensors = {}
    for name in ("model.safetensors", "model_1.safetensors", "ema.safetensors"):
        tensors.update(load_file(checkpoint / name))
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def popen_train(run: Path, *overrides: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gan_ddp", *train_cmd(run, *overrides)],
        cwd=REPO,
        env=base_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def wait_for(predicate, seconds: float = 180, poll: float = 0.2) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(poll)


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "override",
    ["optim.lr_d=inf", "optim.lr_g=nan", "optim.beta1=nan", "train.max_seconds=inf", "loss.gp_weight=nan",
     "model.leaky_slope=inf", "train.collective_timeout_s=nan", "loss.real_label=nan", "ema.decay=nan",
     "train.rollback_lr_factor=nan"],
)  # fmt: skip
def test_config_rejects_non_finite_floats_naming_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        load_config(None, [override])


# ---------------------------------------------------------------------------------------------- divergence
def test_absurd_learning_rate_stops_with_exit_3_and_writes_nothing_non_finite(tmp_path):
    run = tmp_path / "run"
    overrides = ("train.precision=bf16", "optim.lr_d=1e12", "optim.lr_g=1e12", "checkpoint.every=10", "train.steps=60")
    proc = single(train_cmd(run, *overrides))
    assert proc.returncode == faults.EXIT_DIVERGED, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    assert "training diverged at step 5: loss/d is nan" in line and "no checkpoint was written" in line
    assert not ckpt.list_checkpoints(run / "checkpoints")
    lines = strict_lines(run)
    assert lines[-1]["step"] == 5 and lines[-1]["loss/d"] is None


@pytest.mark.parametrize("log_every", [1, 1000], ids=["caught in the metrics", "caught before a checkpoint"])
def test_divergence_keeps_the_finite_checkpoints_as_resume_point(tmp_path, capsys, monkeypatch, log_every):
    run = tmp_path / "run"
    overrides = ("checkpoint.every=2", "checkpoint.keep=2", "train.steps=12", f"log.every={log_every}")
    original = GanStep.train_step

    def diverging(self, batch, step):  # weights blow up during step 7, as with a too-large learning rate
        original(self, batch, step)
        if step == 7:
            with torch.no_grad():
                self.G_raw.net[0].weight.fill_(float("nan"))

    monkeypatch.setattr(GanStep, "train_step", diverging)
    code, _, err = cli_inproc(train_cmd(run, *overrides), capsys)
    assert code == faults.EXIT_DIVERGED
    line = one_error_line(err)
    if log_every == 1:
        assert "diverged at step 8: loss/d is nan" in line
    else:
        assert "diverged at step 8: non-finite weights in G.net.0.weight" in line
    kept = ckpt.list_checkpoints(run / "checkpoints")
    assert [p.name for p in kept] == ["step_00000004", "step_00000006"]  # rotation never ran for step 8
    assert all(all_finite(p) for p in kept) and str(kept[-1]) in line
    if log_every == 1:
        assert strict_lines(run)[-1]["loss/d"] is None  # the line that showed it, as strict JSON

    monkeypatch.setattr(GanStep, "train_step", original)  # the fix: a lower lr, and no more fault
    code, out, _ = cli_inproc(train_cmd(run, *overrides, "optim.lr_d=1e-4"), capsys)
    assert code == 0 and "resumed from" in out and "step 6)" in out
    assert "optim.lr_d is 0.0001 from the config (the checkpoint had 0.0002)" in out
    assert metric_lines(run)[-1]["lr/d"] == 1e-4
    assert [m["step"] for m in metric_lines(run)] == sorted({m["step"] for m in metric_lines(run)})


@pytest.mark.parametrize("persistent", [False, True], ids=["recovers", "rollbacks exhausted"])
def test_rollback_policy(tmp_path, capsys, monkeypatch, persistent):
    run = tmp_path / "run"
    overrides = ("checkpoint.every=2", "checkpoint.keep=2", "train.steps=12", "log.every=1",
                 "train.on_nonfinite=rollback", "train.max_rollbacks=2")  # fmt: skip
    original, faults_left = GanStep.train_step, [3 if persistent else 1]

    def diverging(self, batch, step):
        original(self, batch, step)
        if step == 7 and faults_left[0]:
            faults_left[0] -= 1
            with torch.no_grad():
                self.G_raw.net[0].weight.fill_(float("nan"))

    monkeypatch.setattr(GanStep, "train_step", diverging)
    code, out, err = cli_inproc(train_cmd(run, *overrides), capsys)
    assert "rolled back to step 6 with learning rates x 0.5 (rollback 1 of 2" in out
    kept = ckpt.list_checkpoints(run / "checkpoints")
    assert all(all_finite(p) for p in kept)
    lines = strict_lines(run)
    assert [m["step"] for m in lines] == list(range(1, lines[-1]["step"] + 1))  # the rolled-back lines are gone
    if persistent:
        assert code == faults.EXIT_DIVERGED and "x 0.25 (rollback 2 of 2" in out
        assert "diverged at step 8: loss/d is nan (mean since the previous log line) (after 2 rollback(s))" in (
            one_error_line(err)
        )
        assert [p.name for p in kept] == ["step_00000004", "step_00000006"]
    else:
        assert code == 0, err
        assert lines[-1]["step"] == 12 and lines[-1]["lr/d"] == lines[-1]["lr/g"] == 1e-4
        assert json.loads((newest_checkpoint(run) / ckpt.STATE).read_text())["lr_scale"] == 0.5
        times = [m["time_s"] for m in lines]
        assert times == sorted(times)


def test_sample_refuses_a_checkpoint_with_non_finite_weights(tmp_path, cli):
    run = tmp_path / "run"
    assert train_inproc(run, "train.steps=10") == 0
    checkpoint = newest_checkpoint(run)  # as a run before the guard existed could have written it
    for name in ("model.safetensors", "ema.safetensors"):
        tensors = load_file(checkpoint / name)
        save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in tensors.items()},
                  checkpoint / name)  # fmt: skip
    ckpt.write_manifest(checkpoint)
    for extra in ((), ("--no-ema",)):
        proc = cli("sample", "--run", run, "--n", "4", "--out", tmp_path / "x.png", *extra, check=False)
        assert proc.returncode == 2
        assert "non-finite weights" in one_error_line(proc.stderr)
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------------- run.dir lock
def test_second_trainer_refuses_and_a_killed_holder_never_blocks(tmp_path, capsys):
    run = tmp_path / "run"
    first = popen_train(run, *LONG, "checkpoint.every=5")
    try:
        wait_for(lambda: (run / "metrics.jsonl").exists())
        t0 = time.monotonic()
        second = single(train_cmd(run, *LONG))
        assert second.returncode == 2, second.stderr[-3000:]
        line = one_error_line(second.stderr)
        assert f"PID {first.pid}" in line and socket.gethostname() in line and "started 20" in line
        assert time.monotonic() - t0 < 60  # at once: no data loading or training before the refusal
        wait_for(lambda: len(ckpt.list_checkpoints(run / "checkpoints")) > 0)
    finally:
        first.kill()  # kill -9: the kernel drops the lock
        first.communicate(timeout=60)
    steps = [m["step"] for m in metric_lines(run)]
    assert steps == sorted(set(steps)), "the refused trainer wrote metrics"
    stopped = json.loads((newest_checkpoint(run) / ckpt.STATE).read_text())["step"]
    capsys.readouterr()
    assert train_inproc(run, f"train.steps={stopped + 2}") == 0
    assert f"step {stopped})" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- I/O errors
def test_run_dir_below_a_file_is_one_line_exit_74(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = cli_inproc(train_cmd(tmp_path / "file" / "run"), capsys)
    assert code == faults.EXIT_IO
    line = one_error_line(err)
    assert str(tmp_path / "file") in line and "not a directory" in line and "ENOTDIR" in line


def test_run_dir_that_is_a_file_is_one_line_exit_74(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = cli_inproc(train_cmd(tmp_path / "file"), capsys)
    assert code == faults.EXIT_IO
    assert one_error_line(err) == f"error: {tmp_path / 'file'}: is a file, not a directory (ENOTDIR)"
    assert (tmp_path / "file").read_text() == "x"


def _raise_in_save(kind: str):
    """A failure as the library reports it, from inside a checkpoint's save at the second checkpoint."""
    from safetensors import SafetensorError

    def fail(path):
        if kind == "ENOSPC":  # measured on a full tmpfs
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        if kind == "EROFS":  # measured on a read-only tmpfs
            raise SafetensorError(
                f'Error while serializing: I/O error: Read-only file system (os error 30) at path "{path}"'
            )
        if kind == "EACCES":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        raise RuntimeError(
            "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
        )  # torch.save, disk full

    return fail


@pytest.mark.parametrize(
    ("kind", "words"),
    [("ENOSPC", "disk full"), ("EROFS", "read-only filesystem"), ("EACCES", "permission denied"),
     ("torch-ENOSPC", "disk full")],
)  # fmt: skip
def test_write_failure_during_a_checkpoint(tmp_path, capsys, monkeypatch, kind, words):
    run = tmp_path / "run"
    real_save, fail = ckpt.save_file, _raise_in_save(kind)
    calls = []

    def flaky(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if ".tmp-step_00000020" in str(filename):
            fail(filename)
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", flaky)
    if kind == "torch-ENOSPC":  # no errno in torch's message: the free space decides

        class Full:
            f_bavail, f_frsize = 0, 4096

        monkeypatch.setattr(faults.os, "statvfs", lambda path: Full())
    code, _, err = cli_inproc(train_cmd(run, "train.steps=30", "checkpoint.every=10", "checkpoint.keep=1"), capsys)
    assert code == faults.EXIT_IO, err
    line = one_error_line(err)
    assert words in line and ".tmp-step_00000020" in line and kind.split("-")[-1] in line
    assert not list((run / "checkpoints").glob(".tmp-*")), "the half-written checkpoint was left behind"
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_00000010"]
    ckpt.verify(run / "checkpoints" / "step_00000010")


# ---------------------------------------------------------------------------------------------- safe loading
class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("target", ["optimizer.safetensors", "rng_0.json", "rng_0.json missing"])
def test_checkpoint_file_failing_safe_loading_is_refused(tmp_path, capsys, target):
    """A pickle where a checkpoint holds tensors, an unreadable or missing RNG file (exact resume needs every
    process's): one line naming the file, exit 2, even with a manifest that matches. tests/test_untrusted_files.py
    puts every payload form in every file."""
    run = tmp_path / "run"
    assert train_inproc(run, "train.steps=10") == 0
    checkpoint = newest_checkpoint(run)
    marker = tmp_path / "code-ran"
    name = target.split()[0]
    if target == "optimizer.safetensors":  # a pickle that would run a command
        payload = _Payload()
        payload.marker = marker
        torch.save({"state": payload}, checkpoint / name)
    elif target == "rng_0.json":
        (checkpoint / name).write_bytes(pickle.dumps({"random_state": None})[:10])
    else:
        (checkpoint / name).unlink()
    ckpt.write_manifest(checkpoint)
    code, _, err = cli_inproc(train_cmd(run, "train.steps=20"), capsys)
    assert code == 2
    line = one_error_line(err)
    assert (str(checkpoint / name) if "missing" not in target else f"{checkpoint}: {name} is missing") in line
    assert "missing" in target or "read as data only" in line  # what was checked: no unpickler ran
    assert not marker.exists(), "the pickle ran code"


# ---------------------------------------------------------------------------------------------- Ctrl-C
def test_second_ctrl_c_aborts_but_a_relayed_copy_does_not(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    stop = StopRequest()
    stop.handler(signal.SIGINT, None)
    assert stop.signal == signal.SIGINT
    clock[0] += SECOND_INTERRUPT_AFTER_S / 10  # torchrun relays the terminal's Ctrl-C to its workers
    stop.handler(signal.SIGINT, None)
    clock[0] += SECOND_INTERRUPT_AFTER_S
    with pytest.raises(KeyboardInterrupt):
        stop.handler(signal.SIGINT, None)


def test_interrupt_is_one_line_exit_130(capsys, monkeypatch):
    from gan_ddp.commands import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "plot", interrupted)
    assert cli.main(["plot", "--run", "x"]) == 130
    assert "interrupted" in one_error_line(capsys.readouterr().err)


def test_signals_after_the_stop_checkpoint_keep_exit_75(monkeypatch):
    """The command's handler outside the loop (runtime.faults): once the stop checkpoint is written, the relayed copy
    of the stop's Ctrl-C is ignored and any later signal ends the process with 75, never 130 or death by signal."""
    exits, lines = [], []
    monkeypatch.setattr(faults.os, "_exit", lambda code: exits.append(code))
    monkeypatch.setattr(faults.os, "write", lambda fd, data: lines.append(data.decode()))
    clock = [50.0]
    monkeypatch.setattr(faults.time, "monotonic", lambda: clock[0])
    faults._exit_at_once(signal.SIGINT, None)  # no stop yet: an interrupt
    assert exits == [faults.EXIT_INTERRUPTED] and "interrupted" in lines[-1]
    try:
        faults.stopped_after_checkpoint(clock[0])
        clock[0] += SECOND_INTERRUPT_AFTER_S / 2
        faults._exit_at_once(signal.SIGINT, None)  # the launcher's relayed copy: ignored
        assert exits == [faults.EXIT_INTERRUPTED]
        clock[0] += SECOND_INTERRUPT_AFTER_S
        for signum in (signal.SIGINT, signal.SIGTERM):
            faults._exit_at_once(signum, None)
            assert exits[-1] == faults.EXIT_PREEMPTED and lines[-1] == f"error: {faults.STOPPED_AGAIN_LINE}\n"
    finally:
        faults.stopped_after_checkpoint(None)


def test_second_ctrl_c_after_the_stop_checkpoint_is_one_line_exit_75(capsys, monkeypatch):
    from gan_ddp.commands import cli

    def interrupted(args):
        faults.stopped_after_checkpoint(1.0)  # what the trainer says once its stop checkpoint is written
        raise KeyboardInterrupt  # StopRequest.handler: a Ctrl-C more than 1 s after the first

    monkeypatch.setitem(cli.COMMANDS, "plot", interrupted)
    try:
        assert cli.main(["plot", "--run", "x"]) == 75
    finally:
        faults.stopped_after_checkpoint(None)
    assert one_error_line(capsys.readouterr().err) == f"error: {faults.STOPPED_AGAIN_LINE}"


def test_ctrl_c_checkpoints_and_exits_75(tmp_path, capsys):
    run = tmp_path / "run"
    proc = popen_train(run, *LONG, "checkpoint.every=100000")
    wait_for(lambda: (run / "metrics.jsonl").exists())
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # the same Ctrl-C relayed by a launcher: not an abort
    # A copy that a loaded machine relays late lands after the stop checkpoint, in the shut-down: still 75, the
    # checkpoint kept (it once met the interpreter's teardown, which had put back SIGINT's default: death by signal).
    wait_for(lambda: (run / "PREEMPTED").exists() or proc.poll() is not None, poll=0.005)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "stop requested by signal" in stdout and (run / "PREEMPTED").exists()
    step = json.loads((newest_checkpoint(run) / ckpt.STATE).read_text())["step"]
    capsys.readouterr()
    assert train_inproc(run, f"train.steps={step + 2}") == 0
    assert f"step {step})" in capsys.readouterr().out


@pytest.mark.slow
def test_second_ctrl_c_aborts_at_once(tmp_path):
    run, err = tmp_path / "run", tmp_path / "stderr.txt"
    # DCGAN at batch 2000: a step takes long enough for the test to catch the stop in the middle of it.
    slow = ("model.arch=dcgan", "train.batch_size=2000", "checkpoint.every=100000")
    with err.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gan_ddp", *train_cmd(run, *LONG, *slow)],
            cwd=REPO,
            env=base_env(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    wait_for(lambda: (run / "metrics.jsonl").exists(), seconds=300)
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: "Ctrl-C: stopping" in err.read_text(), seconds=60, poll=0.005)
    # Frozen mid-stop, the run cannot finish its checkpoint before the second Ctrl-C, however fast this
    # machine's steps are; that Ctrl-C, delivered on SIGCONT, comes more than SECOND_INTERRUPT_AFTER_S later.
    proc.send_signal(signal.SIGSTOP)
    time.sleep(SECOND_INTERRUPT_AFTER_S + 0.3)
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGCONT)
    proc.wait(timeout=120)
    text = err.read_text()
    assert proc.returncode == 130, text[-3000:]
    assert time.monotonic() - t0 < 30
    assert "interrupted" in one_error_line("\n".join(s for s in text.splitlines() if not s.startswith("Ctrl-C:")))
    assert not list((run / "checkpoints").glob("step_*")) and not (run / "PREEMPTED").exists()


# ---------------------------------------------------------------------------------------------- several processes
def _workers(launcher: subprocess.Popen) -> list[psutil.Process]:
    procs = [c for c in psutil.Process(launcher.pid).children(recursive=True) if "gan_ddp" in " ".join(c.cmdline())]
    return sorted(procs, key=lambda p: p.pid)


def _rank(proc: psutil.Process) -> int:
    return int(proc.environ().get("RANK", "-1"))


def _launch(run: Path, *overrides: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        torchrun_cmd(2, train_cmd(run, *overrides)),
        cwd=REPO,
        env=base_env(),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )


@pytest.mark.multiprocess
def test_divergence_under_torchrun_is_one_line_not_a_consistency_failure(tmp_path):
    run = tmp_path / "run"
    overrides = ("optim.lr_d=1e12", "optim.lr_g=1e12", "checkpoint.every=1", "train.steps=20", "log.every=1000")
    proc = torchrun(2, train_cmd(run, *overrides, "train.check_consistency=true"))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert output.count("error: training diverged at step 1: non-finite weights in") == 1, output[-3000:]
    assert "differs between rank" not in output and "DivergenceError" not in output  # torchrun has its own traceback
    assert "exitcode  : 3" in output
    assert not ckpt.list_checkpoints(run / "checkpoints")


@pytest.mark.multiprocess
def test_ctrl_c_on_the_process_group_under_torchrun(tmp_path):
    run, log = tmp_path / "run", tmp_path / "out.txt"
    launcher = _launch(run, *LONG, "checkpoint.every=100000", log=log)
    wait_for(lambda: (run / "metrics.jsonl").exists())
    os.killpg(launcher.pid, signal.SIGINT)  # what a terminal does: torchrun and both workers, then torchrun relays
    launcher.wait(timeout=180)
    output = log.read_text()
    assert output.count("stop requested by signal") == 1, output[-3000:]
    assert "KeyboardInterrupt" not in output and "aborts at once" in output
    assert (run / "PREEMPTED").exists()
    step = json.loads((newest_checkpoint(run) / ckpt.STATE).read_text())["step"]
    assert step > 0


@pytest.mark.multiprocess
@pytest.mark.slow
def test_stalled_rank_times_out_with_one_line_and_a_rerun_resumes(tmp_path):
    run, log = tmp_path / "run", tmp_path / "out.txt"
    timeout = 10
    overrides = (*LONG, "checkpoint.every=5", f"train.collective_timeout_s={timeout}")
    launcher = _launch(run, *overrides, log=log)
    wait_for(lambda: len(ckpt.list_checkpoints(run / "checkpoints")) > 0)
    workers = _workers(launcher)
    assert sorted(_rank(w) for w in workers) == [0, 1]
    stalled = next(w for w in workers if _rank(w) == 1)
    stalled.suspend()  # SIGSTOP: alive, holding its sockets, answering nothing
    t0 = time.monotonic()
    try:
        wait_for(lambda: "error: a collective operation timed out" in log.read_text(), seconds=timeout + 60)
        waited = time.monotonic() - t0
    finally:
        stalled.resume()
    launcher.wait(timeout=120)
    output = log.read_text()
    assert waited >= timeout - 1 and waited < timeout + 60
    assert f"timed out after {timeout:g} s (train.collective_timeout_s)" in output, output[-3000:]
    assert launcher.returncode != 0
    newest = json.loads((newest_checkpoint(run) / ckpt.STATE).read_text())["step"]
    rerun = torchrun(2, train_cmd(run, "log.every=1", "checkpoint.every=5", f"train.steps={newest + 2}"))
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"(step {newest})" in rerun.stdout


@pytest.mark.multiprocess
def test_dead_worker_ends_torchrun_at_once_and_a_rerun_resumes(tmp_path):
    run, log = tmp_path / "run", tmp_path / "out.txt"
    launcher = _launch(run, *LONG, "checkpoint.every=5", log=log)
    wait_for(lambda: len(ckpt.list_checkpoints(run / "checkpoints")) > 0)
    victim = next(w for w in _workers(launcher) if _rank(w) == 1)
    victim.kill()  # kill -9 of one worker
    t0 = time.monotonic()
    launcher.wait(timeout=120)
    assert time.monotonic() - t0 < 60 and launcher.returncode == 1
    newest = json.loads((newest_checkpoint(run) / ckpt.STATE).read_text())["step"]
    rerun = torchrun(2, train_cmd(run, "log.every=1", "checkpoint.every=5", f"train.steps={newest + 2}"))
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"(step {newest})" in rerun.stdout


@pytest.mark.multiprocess
def test_consistency_check_treats_nan_on_every_rank_as_equal(tmp_path):
    """NaN != NaN: all ranks NaN is not a difference between ranks; NaN on one rank is."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import torch\n"
        "from accelerate import Accelerator\n"
        "from gan_ddp.runtime.distributed import ConsistencyError, check_consistency\n"
        "acc = Accelerator(cpu=True)\n"
        "torch.manual_seed(0)\n"
        "net = torch.nn.Linear(3, 2)\n"
        "torch.nn.init.constant_(net.weight, float('nan'))\n"
        "assert check_consistency(acc, {'G': net}, step=1) == 2\n"
        "if acc.process_index == 1:\n"
        "    torch.nn.init.constant_(net.bias, float('nan'))\n"
        "try:\n"
        "    check_consistency(acc, {'G': net}, step=2)\n"
        "except ConsistencyError as exc:\n"
        "    print(exc)\n"
        "acc.end_training()\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", *ONE_MACHINE, "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(cmd, cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("G.bias differs between rank 0 and rank 1") == 2


def test_collective_failure_lines():
    timed_out = RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation")
    assert faults.describe(timed_out) == (1, faults.collective_failure(timed_out))
    assert "timed out after 5 s" in faults.collective_failure(timed_out)
    assert "died" in faults.collective_failure(RuntimeError("Connection closed by peer [127.0.0.1]:35222"))
    assert faults.describe(RuntimeError("something else")) is None


def test_collective_failure_names_the_lost_process_or_host():
    timed_out = RuntimeError(
        "[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 15000ms for recv operation"
    )
    timed_out.lost_peers = "rank 1 on node2 did not answer within 10 s (lost host, network or process)"
    line = faults.collective_failure(timed_out)
    assert "timed out after 15 s (train.collective_timeout_s): rank 1 on node2 did not answer" in line
    closed = RuntimeError("[pair.cc:598] Connection closed by peer [127.0.0.1]:35222")
    assert "another process of this run at localhost (127.0.0.1) died" in faults.collective_failure(closed)


def test_metrics_lines_are_strict_json():
    from gan_ddp.runtime.guard import nonfinite_metric, strict_json

    metrics = {"step": 5, "loss/d": math.nan, "loss/g": math.inf, "score/real": 0.5, "lr/d": 1e12}
    assert json.dumps(strict_json(metrics), allow_nan=False) == (
        '{"step": 5, "loss/d": null, "loss/g": null, "score/real": 0.5, "lr/d": 1000000000000.0}'
    )
    assert nonfinite_metric(metrics) == "loss/d" and nonfinite_metric({"loss/d": 1.0}) is None


# ---------------------------------------------------------------------------------------------- start-up signals
@pytest.mark.parametrize(
    ("signum", "after_s", "code"),
    [(signal.SIGTERM, 1.0, 75), (signal.SIGTERM, 5.0, 75), (signal.SIGUSR1, 1.5, 75), (signal.SIGINT, 1.0, 130)],
    ids=["SIGTERM at import", "SIGTERM at set-up", "SIGUSR1", "Ctrl-C"],
)
def test_signal_during_start_up_is_one_line_and_a_documented_code(tmp_path, signum, after_s, code):
    """A job cancelled right after it starts: imports, data, models. Before the loop's own handlers exist,
    a stop signal ends the process at once with one line and 75 (run again) or 130 (Ctrl-C); run.lock is free."""
    import fcntl

    run = tmp_path / "run"
    # Set-up made long on any machine: the evaluator (eval.every) is trained first, into an empty cache.
    proc = popen_train(run, *LONG, "eval.every=1000", f"eval.cache_dir={tmp_path / 'cache'}")
    time.sleep(after_s)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stdout[-2000:] + stderr[-2000:]
    line = one_error_line(stderr)
    assert ("interrupted (Ctrl-C)" if code == 130 else f"stopped by {signal.Signals(signum).name}") in line
    if (run / "run.lock").exists():  # the lock went with the process
        with open(run / "run.lock") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_only_the_command_installs_signal_handlers():
    assert faults.running_as_command(["/usr/bin/gan-ddp", "train"], [])
    assert faults.running_as_command(["-m"], ["python", "-u", "-m", "gan_ddp", "train"])
    assert not faults.running_as_command(["-m"], ["python", "-m", "pytest", "tests"])
    assert not faults.running_as_command(["train.py"], ["python", "train.py"])


# ---------------------------------------------------------------------------------------------- metrics.jsonl
def _training_steps(run: Path) -> list[int]:
    steps = [m["step"] for m in metric_lines(run) if "loss/d" in m]
    assert steps == sorted(set(steps)), f"duplicated or out-of-order steps: {steps}"
    return steps


def test_metrics_agree_with_the_state_on_every_restart_path(tmp_path, capsys):
    """Killed before its first checkpoint, then every checkpoint corrupt: each start from step 0 leaves
    metrics.jsonl without a step twice (the earlier lines are moved aside, not lost). Resume and rollback:
    test_resume_is_exact_mid_epoch, test_rollback_policy."""
    from _runs import single

    run = tmp_path / "run"
    overrides = ("train.steps=30", "checkpoint.every=1000", "log.every=5")
    killed = single(train_cmd(run, *overrides), env=base_env(**{ckpt.CRASH_ENV: "30"}))  # dies in its only save
    assert killed.returncode == 137 and not ckpt.find_latest(run / "checkpoints")
    assert _training_steps(run) == [5, 10, 15, 20, 25, 30]
    capsys.readouterr()
    assert train_inproc(run, *overrides) == 0
    assert "moved to metrics.jsonl.discarded" in capsys.readouterr().out
    assert _training_steps(run) == [5, 10, 15, 20, 25, 30]
    assert len((run / "metrics.jsonl.discarded").read_text().splitlines()) == 6

    for checkpoint in ckpt.list_checkpoints(run / "checkpoints"):  # every checkpoint corrupt: from step 0 again
        (checkpoint / "model.safetensors").write_bytes(b"corrupt")
    assert train_inproc(run, "train.steps=35", "checkpoint.every=1000", "log.every=5") == 0
    assert "skipping checkpoint" in capsys.readouterr().out
    assert _training_steps(run) == [5, 10, 15, 20, 25, 30, 35]


def test_changed_settings_on_resume_are_named(tmp_path, capsys):
    run = tmp_path / "run"
    assert train_inproc(run, "train.steps=10") == 0
    capsys.readouterr()
    assert train_inproc(run, "train.steps=12", "loss.kind=hinge", "model.dropout=0.1", "ema.decay=0.5") == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if "other settings" in line]
    assert len(notes) == 1
    for part in ("ema.decay 0.9 -> 0.5", "loss.kind 'bce' -> 'hinge'", "model.dropout 0.3 -> 0.1"):
        assert part in notes[0]


@pytest.mark.multiprocess
def test_batch_that_does_not_divide_is_reported_once(tmp_path):
    proc = torchrun(2, train_cmd(tmp_path / "run", "train.batch_size=63"))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert output.count("error: train.batch_size: 63 does not divide by the 2 processes") == 1, output[-3000:]
