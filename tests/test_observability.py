"""What a user sees of a real training: the offline W&B run (read from its files), the console on a
terminal and off it, plots and the progress GIF across a resume, and a W&B failure that must not matter."""

from __future__ import annotations

import os
import subprocess
import sys

import imageio.v3 as iio
import pytest
from _runs import REPO, base_env, cli_inproc, metric_lines, single, torchrun, train_cmd, train_inproc
from PIL import Image

SHORT = ("train.steps=12", "log.every=3", "log.sample_every=4", "checkpoint.every=8")


def wandb_env(tmp_path) -> dict[str, str]:
    # No credentials, a private HOME: `auto` must fall back to offline by itself.
    env = base_env(HOME=str(tmp_path / "home"), WANDB_SILENT="true")
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR"):
        env.pop(key, None)
    return env


def offline_runs(run_dir):
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_offline_wandb_run_holds_grids_and_metrics_and_resumes_the_same_run(tmp_path):
    run = tmp_path / "run"
    args = [a for a in train_cmd(run, *SHORT) if a != "log.wandb=disabled"] + ["log.wandb=auto"]
    first = single(args, env=wandb_env(tmp_path))
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("W&B: no credentials found, logging offline") == 1
    [wrun] = offline_runs(run)
    images = list((wrun / "files" / "media" / "images").rglob("*.png"))
    assert len([p for p in images if "grid" in p.name]) == 3  # steps 4, 8, 12
    log = next(wrun.glob("run-*.wandb")).read_bytes()
    for key in (b"loss/d", b"loss/g", b"score/real", b"score/fake", b"img_per_s", b"world_size"):
        assert key in log
    run_id = (run / "wandb_run_id.txt").read_text().strip()
    assert run_id in wrun.name

    more = single([a if a != "train.steps=12" else "train.steps=16" for a in args], env=wandb_env(tmp_path))
    assert more.returncode == 0, more.stderr[-3000:]
    assert (run / "wandb_run_id.txt").read_text().strip() == run_id
    assert all(run_id in p.name for p in offline_runs(run))  # the same W&B run, continued


@pytest.mark.multiprocess
def test_two_processes_make_exactly_one_wandb_run(tmp_path):
    run = tmp_path / "run"
    args = [a for a in train_cmd(run, *SHORT) if a != "log.wandb=disabled"] + ["log.wandb=offline"]
    out = torchrun(2, args, env=wandb_env(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(offline_runs(run)) == 1


def test_wandb_init_failure_warns_once_and_training_completes(tmp_path, capsys, monkeypatch):
    import wandb

    def broken(*args, **kwargs):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(wandb, "init", broken)
    assert train_inproc(tmp_path / "run", *SHORT, "log.wandb=offline") == 0
    out = capsys.readouterr().out
    assert out.count("W&B disabled: ConnectionError: network unreachable; training continues") == 1
    assert [m["step"] for m in metric_lines(tmp_path / "run")] == [3, 6, 9, 12]


def test_plots_and_gif_cover_a_resumed_run(tmp_path):
    run = tmp_path / "run"
    assert train_inproc(run, "train.steps=8", "log.every=2", "log.sample_every=4", "log.plots=true") == 0
    assert train_inproc(run, "train.steps=16", "log.every=2", "log.sample_every=4", "log.plots=true") == 0
    grids = sorted((run / "samples").glob("step_*.png"))
    assert [p.name for p in grids] == [f"step_{s:08d}.png" for s in (4, 8, 12, 16)]
    frames = iio.imread(run / "samples" / "progress.gif", index=None)
    assert frames.shape[0] == len(grids)
    for name in ("losses.png", "scores.png"):
        with Image.open(run / "plots" / name) as img:
            assert img.format == "PNG" and img.size[0] > 300
    assert [m["step"] for m in metric_lines(run)] == list(range(2, 17, 2))


def test_log_plots_false_skips_the_plots_and_gif_and_the_commands_write_them_later(tmp_path):
    run = tmp_path / "run"
    assert train_inproc(run, "train.steps=8", "log.every=2", "log.sample_every=4", "log.plots=false") == 0
    assert not (run / "plots").exists() and not (run / "samples" / "progress.gif").exists()
    assert len(list((run / "samples").glob("step_*.png"))) == 2  # the grids are not plots: still there
    assert cli_inproc("plot", "--run", run).returncode == 0
    assert cli_inproc("animate", "--run", run).returncode == 0
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["losses.png", "scores.png"]
    assert iio.imread(run / "samples" / "progress.gif", index=None).shape[0] == 2


def test_rich_live_view_under_a_terminal(tmp_path):
    """A pseudo-terminal makes stdout a tty: the live progress bar runs and the run completes."""
    import pty

    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gan_ddp", *train_cmd(tmp_path / "run", "train.steps=6", "log.every=2")],
        cwd=REPO,
        env={**base_env(), "TERM": "xterm-256color", "COLUMNS": "120"},
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
    )
    os.close(secondary)
    chunks = []
    while True:
        try:
            data = os.read(primary, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=120) == 0
    screen = b"".join(chunks).decode(errors="replace")
    assert "\x1b[" in screen  # the live view redraws with escape codes
    assert "6/6" in screen and "gan-ddp run" in screen


def test_plain_console_line_shows_training_time_and_budget(capsys) -> None:
    from gan_ddp.runtime.console import TrainingConsole

    metrics = {"step": 300, "epoch": 2, "time_s": 61.4, "img_per_s": 1234.0, "loss/d": 1.0, "loss/g": 2.0}
    TrainingConsole(enabled=True, live=False).log(metrics, 1000, budget=600.0)
    TrainingConsole(enabled=True, live=False).log(metrics, 1000)
    TrainingConsole(enabled=False, live=False).log(metrics, 1000, budget=600.0)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "step 300/1000  epoch 2  61/600 s  1,234 img/s  D 1.000  G 2.000",
        "step 300/1000  epoch 2  61 s  1,234 img/s  D 1.000  G 2.000",
    ]
