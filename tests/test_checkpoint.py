"""Checkpoints: exact resume mid-epoch, crash during a save, rotation, corrupt and foreign checkpoints,
preemption signals and the time budget. One process here; tests/test_ddp.py repeats the key ones with two."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from _runs import (
    REPO,
    assert_same_tensors,
    base_env,
    checkpoint_tensors,
    losses_by_step,
    metric_lines,
    newest_checkpoint,
    single,
    train_cmd,
    train_inproc,
)

from gan_ddp.runtime import checkpoint as ckpt

# 2000 images per step: 5 steps per epoch on the 10k test split, so short runs cross epochs.
EXACT = ("train.batch_size=2000", "train.epochs=100", "log.every=3", "log.sample_every=4", "checkpoint.every=100")


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_resume_is_exact_mid_epoch(tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train_inproc(straight, *EXACT, "train.steps=14") == 0
    assert train_inproc(split, *EXACT, "train.steps=7") == 0  # stops at epoch 1, batch 2 of 5
    state = json.loads((newest_checkpoint(split) / ckpt.STATE).read_text())
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (7, 1, 2)
    capsys.readouterr()
    assert train_inproc(split, *EXACT, "train.steps=14") == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step 7" in out

    assert_same_tensors(checkpoint_tensors(newest_checkpoint(straight)), checkpoint_tensors(newest_checkpoint(split)))
    assert losses_by_step(straight, after=7) == losses_by_step(split, after=7)
    steps = [m["step"] for m in metric_lines(split)]
    assert steps == sorted(set(steps)), "duplicate or unordered steps after resume"
    assert set(losses_by_step(straight)) <= set(steps)
    times = [m["time_s"] for m in metric_lines(split)]  # training seconds continue across the resume
    assert times == sorted(times) and times[0] > 0
    grids = {p.name for p in (split / "samples").glob("step_*.png")}
    assert {"step_00000004.png", "step_00000008.png", "step_00000012.png"} <= grids


def test_kill_during_save_resumes_from_previous_complete(tmp_path, capsys):
    run = tmp_path / "run"
    overrides = (*EXACT, "checkpoint.every=4", "train.steps=12")
    crashed = single(train_cmd(run, *overrides), env=base_env(**{ckpt.CRASH_ENV: "8"}))
    assert crashed.returncode == 137
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_00000004"]
    assert list((run / "checkpoints").glob(".tmp-*")), "the killed save left its temporary directory"

    capsys.readouterr()
    assert train_inproc(run, *overrides) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step_00000004" in out
    assert not list((run / "checkpoints").glob(".tmp-*"))
    straight = tmp_path / "straight"
    assert train_inproc(straight, *overrides) == 0
    assert_same_tensors(checkpoint_tensors(newest_checkpoint(straight)), checkpoint_tensors(newest_checkpoint(run)))


def test_rotation_corrupt_fallback_explicit_and_mismatch(tmp_path, capsys):
    run = tmp_path / "run"
    assert train_inproc(run, "checkpoint.every=5", "checkpoint.keep=2", "train.steps=20") == 0
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_00000015", "step_00000020"]

    newest = run / "checkpoints" / "step_00000020"
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="checksum"):
        ckpt.verify(newest)

    capsys.readouterr()
    assert train_inproc(run, "checkpoint.every=5", "checkpoint.keep=2", "train.steps=22") == 0
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and "step_00000015" in out

    weights.write_bytes(bytes(data))  # the fallback run rewrote step 20: corrupt it again
    explicit = single(train_cmd(tmp_path / "other", f"train.resume={newest}", "train.steps=25"))
    assert explicit.returncode == 2
    assert explicit.stderr.strip().count("\n") == 0 and "checksum" in explicit.stderr

    foreign = single(train_cmd(run, "model.g_hidden=[32,64]", "train.steps=30"))
    assert foreign.returncode == 2
    assert "model.g_hidden" in foreign.stderr and "Traceback" not in foreign.stderr


def test_max_seconds_checkpoints_and_exits_zero(tmp_path, capsys):
    run = tmp_path / "run"
    t0 = time.monotonic()
    budget = ("train.epochs=1000", "train.steps=null", "train.max_seconds=4", "checkpoint.every=100000")
    assert train_inproc(run, *budget) == 0
    assert time.monotonic() - t0 < 60
    assert "max_seconds reached" in capsys.readouterr().out
    state = json.loads((newest_checkpoint(run) / ckpt.STATE).read_text())
    assert 0 < state["step"] < 1_000_000
    assert not (run / "PREEMPTED").exists()
    assert not (run / "DONE").exists()  # a time budget is not the end of training


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_checkpoints_and_exits_75(tmp_path, signum, capsys):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gan_ddp", *train_cmd(run, "train.epochs=1000", "train.steps=null", "log.every=1")],
        cwd=REPO,
        env=base_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stdout[-2000:] + stderr[-2000:]
    assert (run / "PREEMPTED").exists() and not (run / "DONE").exists()
    step = json.loads((newest_checkpoint(run) / ckpt.STATE).read_text())["step"]
    assert step > 0
    # Rerunning the same command resumes from there and removes the marker.
    capsys.readouterr()
    assert train_inproc(run, f"train.steps={step + 3}") == 0
    assert f"step {step})" in capsys.readouterr().out and not (run / "PREEMPTED").exists()
    assert (run / "DONE").read_text() == f"step {step + 3}\n"  # the job scripts' "do not requeue"


def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    def no_network(root: str, train: bool, download: bool) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: <urlopen error [Errno -2] Name unknown>")

    monkeypatch.setattr(torchvision.datasets, "MNIST", no_network)


def test_offline_training_falls_back_records_the_data_and_never_switches(tmp_path, monkeypatch, capsys):
    """`make train` without a network: the bundled split stands in, is recorded, and a resume that would read
    other data (the full set downloaded since) is refused with one line naming both."""
    import yaml

    from gan_ddp.components.data import BUNDLED, data_checksum, load_arrays

    run, empty = tmp_path / "run", tmp_path / "data"
    offline = (f"data.root={empty}", "data.split=train", "data.download=true", "train.steps=10")
    _offline(monkeypatch)
    assert train_inproc(run, *offline) == 0
    out = capsys.readouterr().out
    assert "could not download mnist" in out and "bundled MNIST test split" in out
    images, labels = load_arrays("mnist", BUNDLED, "test", download=False)
    facts = yaml.safe_load((run / "config.yaml").read_text())
    assert facts["data"]["root"] == BUNDLED and facts["data"]["split"] == "test"  # what the run really read
    used = facts["resolved"]["data"]
    assert used == {
        "dataset": "mnist",
        "split": "test",
        "root": BUNDLED,
        "source": "fallback",
        "images": 10_000,
        "sha256": data_checksum(images, labels),
    }
    assert json.loads((newest_checkpoint(run) / ckpt.STATE).read_text())["data"]["sha256"] == used["sha256"]

    # Still offline: the same fallback, so the run resumes.
    assert train_inproc(run, *offline[:-1], "train.steps=20") == 0
    assert "resumed from" in capsys.readouterr().out

    # Now the "full set" is there (a stand-in: the first 5,000 images as a train split): refused, nothing lost.
    from test_data import idx_bytes

    empty.mkdir()
    (empty / "train-images-idx3-ubyte").write_bytes(idx_bytes(images[:5000].numpy()))
    (empty / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels[:5000].numpy()))
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(ckpt.CheckpointError) as excinfo:
        train_inproc(run, *offline[:-1], "train.steps=30")
    message = str(excinfo.value)
    assert "\n" not in message
    for part in ("trained on mnist test from bundled (10,000 images)", f"mnist train from {empty}", "5,000 images"):
        assert part in message
    assert "data.root=bundled data.split=test" in message and "new run.dir" in message
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert train_inproc(run, "data.root=bundled", "data.split=test", "train.steps=30") == 0  # the fix it names


# ---------------------------------------------------------------------------------------------- the files
def test_optimizer_state_survives_safetensors_and_json_bitwise(tmp_path):
    """Adam's state tensors go to safetensors, its hyper-parameters (betas a tuple) and the rest to JSON."""
    import torch

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.5, 0.999))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, rest = ckpt.split_optimizer_state(opt.state_dict())
    ckpt._save_tensors(tensors, tmp_path / "o.safetensors")
    ckpt.write_json(tmp_path / "o.json", rest)
    state = ckpt.join_optimizer_state(
        ckpt.read_tensors(tmp_path / "o.safetensors"), ckpt.read_json(tmp_path / "o.json")
    )
    other = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=1.0)
    other.load_state_dict(state)
    a, b = opt.state_dict(), other.state_dict()
    assert a["param_groups"] == b["param_groups"] and isinstance(b["param_groups"][0]["betas"], tuple)
    for pid, slots in a["state"].items():
        for slot, value in slots.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][pid][slot])), (pid, slot)


def test_rng_states_survive_json(tmp_path):
    """Python, NumPy and torch generators continue exactly where the saving process left them."""
    import random

    import numpy as np
    import torch

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # a cached Gaussian in NumPy's state
    ckpt.write_json(tmp_path / "rng.json", ckpt.rng_state())
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(ckpt._rng_from_json(ckpt.read_json(tmp_path / "rng.json")))
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected


def test_scaler_state_survives_json(tmp_path):
    """fp16's gradient scaler state is floats and ints: JSON writes the doubles exactly (Python's repr)."""
    state = {"scale": 32768.0 / 3, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
             "_growth_tracker": 17}  # fmt: skip
    ckpt.write_json(tmp_path / ckpt.SCALER, state)
    assert ckpt.read_json(tmp_path / ckpt.SCALER) == state
