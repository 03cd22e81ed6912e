"""End-to-end tests of the `gan-ddp` command line (on CPU, real MNIST t10k data).

One short training run (module-scoped, a subprocess: the console output as a user sees it) is shared by the
sample / interpolate / plot / animate tests, which call the command line in this process (`cli`, conftest); the
entry points and `--help` run as processes of their own.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from gan_ddp.config import config_from_dict

STEPS = 12  # smoke.yaml: log every 5, grid and checkpoint every 10, keep 2 -> checkpoints 10 and 12
SMOKE = "configs/smoke.yaml"
METRIC_KEYS = ("step", "epoch", "world_size", "img_per_s", "loss/d", "loss/g", "score/real", "score/fake")
SUBCOMMANDS = ("train", "sample", "plot", "animate", "interpolate")
TILE = 28 + 2  # torchvision grids: 28 px images, 2 px padding between and around them


def grid_size(cols: int, rows: int) -> tuple[int, int]:
    """(width, height) of a torchvision grid of 28x28 tiles with padding 2."""
    return 2 + cols * TILE, 2 + rows * TILE


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one `error:` line on stderr (no traceback) containing every needle."""
    assert result.returncode == 2, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


@dataclass
class Run:
    dir: Path
    result: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def trained(tmp_path_factory, run_cli, smoke_overrides_for) -> Run:
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    result = run_cli("train", "--config", SMOKE, *smoke_overrides_for(run_dir), f"train.steps={STEPS}")
    return Run(run_dir, result)


@pytest.fixture(scope="module")
def ema_samples(trained: Run, cli, tmp_path_factory) -> np.ndarray:
    """100 samples (seed 0, EMA generator, newest checkpoint) as the .npz array."""
    out = tmp_path_factory.mktemp("samples") / "seed0.npz"
    cli("sample", "--run", trained.dir, "--n", "100", "--out", out)
    return np.load(out)["arr_0"]


def sample_array(cli, run_dir: Path, out: Path, *extra: str) -> np.ndarray:
    result = cli("sample", "--run", run_dir, "--n", "100", "--out", out, *extra)
    assert str(out) in result.stdout
    return np.load(out)["arr_0"]


# ------------------------------------------------------------------------------------------------- train


def test_train_writes_the_run_directory(trained: Run, mnist_root: Path) -> None:
    run = trained.dir
    assert trained.result.returncode == 0

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["resolved"]["precision"] == "no"  # smoke.yaml asks for fp32
    assert saved["resolved"]["world_size"] == 1
    cfg = config_from_dict(saved)
    assert cfg.train.steps == STEPS
    assert cfg.run.dir == str(run)
    assert Path(cfg.data.root) == mnist_root

    ckpt = run / "checkpoints" / f"step_{STEPS:08d}"
    assert (ckpt / "manifest.json").is_file()
    assert (ckpt / "model.safetensors").is_file()
    assert "model.safetensors" in json.loads((ckpt / "manifest.json").read_text())["files"]
    assert (run / "checkpoints" / "step_00000010" / "manifest.json").is_file()

    assert (run / "samples" / "step_00000010.png").is_file()
    assert (run / "samples" / f"step_{STEPS:08d}.png").is_file()  # the final grid
    for name in ("plots/losses.png", "plots/scores.png", "samples/progress.gif"):
        assert (run / name).is_file(), name
        with Image.open(run / name) as im:
            assert im.width > 0 and im.height > 0


def test_train_metrics_lines(trained: Run) -> None:
    rows = [json.loads(line) for line in (trained.dir / "metrics.jsonl").read_text().splitlines()]
    assert rows
    for row in rows:
        for key in METRIC_KEYS:
            assert key in row, f"{key} missing from {row}"
            assert isinstance(row[key], int | float) and math.isfinite(row[key]), f"{key}={row[key]!r}"
        assert row["world_size"] == 1
        assert row["epoch"] == 0
        assert row["img_per_s"] > 0
        assert 0.0 <= row["score/real"] <= 1.0 and 0.0 <= row["score/fake"] <= 1.0
    steps = [row["step"] for row in rows]
    assert all(isinstance(s, int) for s in steps)
    assert steps == sorted(set(steps)), f"steps not increasing: {steps}"
    assert steps[-1] == STEPS
    assert 5 in steps and 10 in steps  # log.every=5


def test_train_plain_output_when_not_a_terminal(trained: Run) -> None:
    out = trained.result.stdout
    assert "\x1b" not in out and "\x1b" not in trained.result.stderr  # no ANSI escapes
    assert "\r" not in out  # no progress bar redraws
    step_lines = [line for line in out.splitlines() if re.match(rf"step \d+/{STEPS}\b", line)]
    assert step_lines, f"no `step N/{STEPS}` lines in:\n{out}"
    printed = [int(re.match(r"step (\d+)/", line).group(1)) for line in step_lines]
    assert {5, 10} <= set(printed)
    for line in step_lines:  # one line each: the metrics did not wrap onto the next line
        for part in ("epoch", "img/s", "D ", "G ", "score/real", "score/fake"):
            assert part in line, f"{part!r} not in {line!r}"
        assert re.search(r"epoch \d+  \d+ s  ", line), line  # training time, no budget set


# ------------------------------------------------------------------------------------------------ sample


def test_sample_npz(ema_samples: np.ndarray) -> None:
    assert ema_samples.dtype == np.uint8
    assert ema_samples.shape == (100, 28, 28, 1)
    assert ema_samples.max() > ema_samples.min()
    assert len({ema_samples[i].tobytes() for i in range(100)}) > 1  # not one image repeated


def test_sample_seed_is_reproducible(trained: Run, ema_samples: np.ndarray, cli, tmp_path: Path) -> None:
    again = sample_array(cli, trained.dir, tmp_path / "again.npz", "--seed", "0")
    np.testing.assert_array_equal(again, ema_samples)
    other = sample_array(cli, trained.dir, tmp_path / "other.npz", "--seed", "1")
    assert other.shape == ema_samples.shape
    assert not np.array_equal(other, ema_samples)


def test_sample_no_ema_differs(trained: Run, ema_samples: np.ndarray, cli, tmp_path: Path) -> None:
    raw = sample_array(cli, trained.dir, tmp_path / "raw.npz", "--no-ema")
    assert raw.dtype == np.uint8 and raw.shape == (100, 28, 28, 1)
    assert not np.array_equal(raw, ema_samples)


def test_sample_png_grid(trained: Run, cli, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "grid.png"  # the parent folder is created
    cli("sample", "--run", trained.dir, "--n", "16", "--out", out)
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == grid_size(4, 4) == (122, 122)


def test_sample_bad_suffix(trained: Run, cli, tmp_path: Path) -> None:
    out = tmp_path / "x.jpg"
    result = cli("sample", "--run", trained.dir, "--n", "4", "--out", out, check=False)
    assert_user_error(result, "--out", ".png", ".npz")
    assert not out.exists()


def test_sample_from_a_given_checkpoint(trained: Run, ema_samples: np.ndarray, cli, tmp_path: Path) -> None:
    older = trained.dir / "checkpoints" / "step_00000010"
    out = tmp_path / "older.npz"
    result = cli("sample", "--run", trained.dir, "--checkpoint", older, "--n", "100", "--out", out)
    assert "step_00000010" in result.stdout
    arr = np.load(out)["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (100, 28, 28, 1)
    assert not np.array_equal(arr, ema_samples)  # another checkpoint, other weights


def test_eval_scores_the_file_sample_writes(
    trained: Run, cli, mnist_root: Path, tmp_path: Path, evaluator_cache_copy
) -> None:
    """`gan-ddp sample --out x.npz` then `gan-ddp eval --samples x.npz`, both through the command line."""
    cache = evaluator_cache_copy(tmp_path / "cache")  # the test evaluator: the CLI finds it instead of training one
    samples, scores = tmp_path / "s.npz", tmp_path / "scores.json"
    cli("sample", "--run", trained.dir, "--n", "300", "--out", samples)
    data = ["--root", mnist_root, "--split", "test", "--cache-dir", cache]
    result = cli("eval", "--samples", samples, *data, "--json", scores)
    assert "fid" in result.stdout and "coverage" in result.stdout
    m = json.loads(scores.read_text())
    assert m["eval/n"] == 300 and m["source"] == str(samples)
    assert m["eval/fid"] > 0 and 1 <= m["eval/coverage"] <= 10 and 0 < m["eval/confidence"] <= 1


# ------------------------------------------------------------------------------------------- interpolate


def test_interpolate_sweep(trained: Run, cli, tmp_path: Path) -> None:
    out = tmp_path / "sweep.png"
    cli("interpolate", "--run", trained.dir, "--out", out, "--dim", "3", "--steps", "7", "--rows", "2")
    with Image.open(out) as im:
        assert im.size == grid_size(7, 2)


def test_interpolate_between_seeds(trained: Run, cli, tmp_path: Path) -> None:
    out = tmp_path / "between.png"
    cli("interpolate", "--run", trained.dir, "--out", out, "--between", "1", "2", "--steps", "5")
    with Image.open(out) as im:
        assert im.size == grid_size(5, 8)  # --rows defaults to 8


def test_interpolate_dim_out_of_range(trained: Run, cli, tmp_path: Path) -> None:
    out = tmp_path / "bad.png"
    result = cli("interpolate", "--run", trained.dir, "--out", out, "--dim", "1000", check=False)
    assert_user_error(result, "--dim", "1000")
    assert not out.exists()


# --------------------------------------------------------------------------------------- plot and animate

OLD = 1_000_000_000.0  # 2001: an mtime no file written by this test run can have


def test_plot_rewrites_the_plots(trained: Run, cli) -> None:
    plots = [trained.dir / "plots" / "losses.png", trained.dir / "plots" / "scores.png"]
    for p in plots:
        os.utime(p, (OLD, OLD))
    result = cli("plot", "--run", trained.dir)
    for p in plots:
        assert p.stat().st_mtime > OLD + 1, f"{p} not rewritten"
        assert str(p) in result.stdout
        with Image.open(p) as im:
            assert im.format == "PNG"


def test_animate_rewrites_the_gif(trained: Run, cli) -> None:
    gif = trained.dir / "samples" / "progress.gif"
    os.utime(gif, (OLD, OLD))
    result = cli("animate", "--run", trained.dir)
    assert gif.stat().st_mtime > OLD + 1
    assert str(gif) in result.stdout
    with Image.open(gif) as im:
        assert im.format == "GIF"
        assert im.n_frames == len(list((trained.dir / "samples").glob("step_*.png"))) == 2


def test_plot_on_an_empty_directory(cli, tmp_path: Path) -> None:
    assert_user_error(cli("plot", "--run", tmp_path, check=False), "metrics.jsonl")


def test_animate_on_an_empty_directory(cli, tmp_path: Path) -> None:
    assert_user_error(cli("animate", "--run", tmp_path, check=False), "step_*.png")


# ----------------------------------------------------------------------------------------- user errors


def test_unknown_override_key(cli, smoke_overrides: list[str]) -> None:
    result = cli("train", "--config", SMOKE, *smoke_overrides, "train.bach_size=8", check=False)
    assert_user_error(result, "train.bach_size", "did you mean train.batch_size")


def test_missing_config_file(cli, smoke_overrides: list[str]) -> None:
    result = cli("train", "--config", "configs/no_such_config.yaml", *smoke_overrides, check=False)
    assert_user_error(result, "configs/no_such_config.yaml", "not found")


def test_missing_data(cli, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    run_dir = tmp_path / "run"
    overrides = [f"data.root={empty}", "data.download=false", f"run.dir={run_dir}", "log.wandb=disabled"]
    result = cli("train", "--config", SMOKE, *overrides, check=False)
    line = assert_user_error(result, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", str(empty))
    assert "data.download" in line  # says how to get the files


def test_batch_larger_than_the_dataset(cli, smoke_overrides: list[str]) -> None:
    result = cli("train", "--config", SMOKE, *smoke_overrides, "train.batch_size=20000", check=False)
    assert_user_error(result, "train.batch_size", "20000")


def test_odd_batch_size_trains(cli, smoke_overrides: list[str], tmp_path: Path) -> None:
    cli("train", "--config", SMOKE, *smoke_overrides, "train.batch_size=7", "train.steps=2")
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2
    assert (run / "checkpoints" / "step_00000002" / "manifest.json").is_file()
    resolved = yaml.safe_load((run / "config.yaml").read_text())["resolved"]
    assert resolved["steps_per_epoch"] == 10_000 // 7


# ------------------------------------------------------------------------------------------ entry points


def test_console_script_help() -> None:
    script = Path(sys.executable).parent / "gan-ddp"
    assert script.is_file(), f"console script not installed: {script}"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for command in SUBCOMMANDS:
        assert command in result.stdout


# What answers at once must not import torch (its import alone takes seconds): checked by what is loaded, not
# by timing. Each case runs `main(argv)` in a fresh interpreter and reports the exit code and the heavy modules.
NO_TORCH = """
import sys
from gan_ddp.commands.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "accelerate", "numpy", "torchvision", "wandb") if m in sys.modules)
print("EXIT", code, "HEAVY", ",".join(heavy) or "-", file=sys.stderr)
"""


@pytest.mark.parametrize(
    ("argv", "code", "said"),
    [
        (["--help"], 0, "usage: gan-ddp"),
        (["--version"], 0, "gan-ddp 0."),
        (["train", "--help"], 0, "--config"),
        (["train", "--config", "configs/mnist_mlp.yaml", "trian.steps=5"], 2, "unknown key 'trian'"),
        (["train", "--config", "configs/mnist_mlp.yaml", "train.steps=abc"], 2, "not a valid integer"),
        (["train", "--config", "configs/mnist_mlp.yaml", "loss.kind=lsgan"], 2, "choose one of bce, hinge, wgan-gp"),
    ],
)
def test_help_version_and_config_errors_answer_without_torch(argv, code, said) -> None:
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH, *argv], capture_output=True, text=True, timeout=60, cwd=root
    )
    assert f"EXIT {code} HEAVY -" in result.stderr, result.stderr[-2000:]
    assert said in result.stdout + result.stderr


def test_subcommand_help_and_missing_command(run_cli) -> None:
    result = run_cli("sample", "--help")
    for option in ("--run", "--checkpoint", "--n", "--out", "--seed", "--no-ema"):
        assert option in result.stdout
    result = run_cli(check=False)
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_argument_errors_are_usage_errors_and_other_value_errors_are_bugs(capsys, monkeypatch) -> None:
    """The command line knows a user's mistake by its class (GanDdpError), not by `ValueError`: one line and
    exit 2 for a bad argument; a ValueError from a bug in the package is not dressed up as the user's fault."""
    from gan_ddp.commands import cli

    assert cli.main(["eval", "--samples", "x.npz", "--n", "3"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: --n must be >= 4 and --batch >= 1, got 3 and 500"

    def bug(args):
        raise ValueError("an internal shape mismatch")

    monkeypatch.setitem(cli.COMMANDS, "plot", bug)
    with pytest.raises(ValueError, match="internal"):
        cli.main(["plot", "--run", "x"])
