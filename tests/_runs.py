"""Shared helpers for tests that run real trainings: in subprocesses (one process or several) or in this one."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from gan_ddp.components.data import BUNDLED_DIR

REPO = Path(__file__).resolve().parents[1]
MNIST = BUNDLED_DIR  # the real MNIST t10k split, bundled in the package
SMOKE = REPO / "configs" / "smoke.yaml"
# The test evaluator (conftest's evaluator_cache): enough for >= 97% held out; the default reaches >= 98.5%.
EVALUATOR_EPOCHS = 3


# The end-of-run plots cost ~0.7 CPU-s a training (matplotlib), over a hundred times a suite: off unless a test asks
# for them (`log.plots=true` after these overrides), as the tests of plots, the GIF and the trackers' images do.
NO_PLOTS = ("log.plots=false",)


def base_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}, **extra)
    return env


def train_cmd(run_dir: Path, *overrides: str, config: Path = SMOKE) -> list[str]:
    return [
        "train",
        "--config",
        str(config),
        f"data.root={MNIST}",
        "data.split=test",
        "data.download=false",
        f"run.dir={run_dir}",
        "log.wandb=disabled",
        *NO_PLOTS,
        *overrides,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single(args: list[str], env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gan_ddp", *args],
        cwd=REPO,
        env=env or base_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# One machine, a rendezvous store on a free port. Not `--standalone`: torch 2.0 (the K80 stack) gives that a fixed
# port (29400), so two runs at once (two pytest-xdist workers) share one store and the second fails when the
# first ends; torch 2.1+ spells `--standalone` as exactly these flags.
ONE_MACHINE = ("--nnodes", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0")


def torchrun_cmd(nproc: int, args: list[str], extra: tuple[str, ...] = ()) -> list[str]:
    launcher = extra or ONE_MACHINE
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "--nproc_per_node", str(nproc)]
    return [*cmd, "-m", "gan_ddp", *args]


def torchrun(nproc: int, args: list[str], env: dict[str, str] | None = None, timeout: int = 300):
    return subprocess.run(
        torchrun_cmd(nproc, args), cwd=REPO, env=env or base_env(), capture_output=True, text=True, timeout=timeout
    )


def newest_checkpoint(run_dir: Path) -> Path:
    found = sorted((run_dir / "checkpoints").glob("step_*"))
    assert found, f"no checkpoint in {run_dir}"
    return found[-1]


def checkpoint_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor a resume depends on: G, D, EMA, both optimizers (flattened, keyed by path)."""
    out = {f"G.{k}": v for k, v in load_file(ckpt / "model.safetensors").items()}
    out.update({f"D.{k}": v for k, v in load_file(ckpt / "model_1.safetensors").items()})
    if (ckpt / "ema.safetensors").exists():
        out.update({f"EMA.{k}": v for k, v in load_file(ckpt / "ema.safetensors").items()})
    for name in ("optimizer", "optimizer_1"):  # state tensors as `state.<param id>.<slot>`
        out.update({f"{name}.{k}": v for k, v in load_file(ckpt / f"{name}.safetensors").items()})
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), f"{key} differs"
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


def metric_lines(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


LOSS_KEYS = ("loss/d", "loss/g", "score/real", "score/fake")


def losses_by_step(run_dir: Path, after: int = 0) -> dict[int, tuple]:
    return {m["step"]: tuple(m[k] for k in LOSS_KEYS) for m in metric_lines(run_dir) if m["step"] > after}


def train_inproc(run_dir: Path, *overrides: str, config: Path = SMOKE) -> int:
    """Train in this process (no interpreter start-up): for single-process tests. Accelerate keeps its
    process state in singletons; reset them so each training builds its Accelerator afresh."""
    from accelerate.state import AcceleratorState, GradientState

    from gan_ddp.config import load_config
    from gan_ddp.training.trainer import Trainer

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    cfg = load_config(
        config,
        [f"data.root={MNIST}", "data.split=test", f"run.dir={run_dir}", "log.wandb=disabled", *NO_PLOTS, *overrides],
    )
    return Trainer(cfg).train()


def cli_inproc(*args: object) -> subprocess.CompletedProcess:
    """`gan-ddp *args` through `gan_ddp.commands.cli.main` in THIS process, from the repo root: stdout and stderr
    captured, the exit code as `returncode`, like `single`'s result without the 2-3 s of importing torch. For
    commands whose own process proves nothing; entry points, signals and environment variables need `single`."""
    from accelerate.state import AcceleratorState, GradientState

    from gan_ddp.commands.cli import main

    argv = [str(a) for a in args]
    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh process's Accelerate state
    GradientState._reset_state()
    out, err, cwd = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(REPO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse: --help, usage errors
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.chdir(cwd)
    return subprocess.CompletedProcess(["gan-ddp", *argv], code, out.getvalue(), err.getvalue())


def assert_two_processes_match_one(tmp_path: Path, *overrides: str) -> None:
    """Train the same run with 2 processes (torchrun) and with 1: weights, EMA and per-step losses agree
    up to float reassociation (the optimizer states' moments are compared by the resume tests)."""
    import pytest

    two_proc = torchrun(2, train_cmd(tmp_path / "two", *overrides))
    assert two_proc.returncode == 0, two_proc.stdout[-3000:] + two_proc.stderr[-3000:]
    assert train_inproc(tmp_path / "one", *overrides) == 0
    two, one = (checkpoint_tensors(newest_checkpoint(tmp_path / d)) for d in ("two", "one"))
    assert_same_tensors(
        {k: v for k, v in two.items() if not k.startswith("optimizer")},
        {k: v for k, v in one.items() if not k.startswith("optimizer")},
        atol=2e-5,
    )
    a, b = losses_by_step(tmp_path / "two"), losses_by_step(tmp_path / "one")
    assert a.keys() == b.keys()
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-4)
