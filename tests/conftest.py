"""Shared fixtures: the real MNIST t10k data, a CLI runner (subprocess) and the smoke-run overrides."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from gan_ddp.components.data import BUNDLED_DIR

REPO_ROOT = Path(__file__).resolve().parents[1]
MNIST_ROOT = BUNDLED_DIR
SMOKE_CONFIG = REPO_ROOT / "configs" / "smoke.yaml"

# Variables that would make a child believe it is one rank of a distributed job, or force colour output.
_SCRUBBED = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "FORCE_COLOR")


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """Folder with the real MNIST t10k IDX files (10,000 images), bundled in the package."""
    return MNIST_ROOT


def _cli_env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., subprocess.CompletedProcess]:
    """`run_cli(*args, env=None, check=True)`: `python -m gan_ddp *args` in the repo root, text output.

    `env` adds variables to (a cleaned copy of) os.environ. With `check`, a non-zero exit fails the test
    and shows the child's output."""

    def run(*args: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 300):
        cmd = [sys.executable, "-m", "gan_ddp", *map(str, args)]
        result = subprocess.run(cmd, cwd=REPO_ROOT, env=_cli_env(env), capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            pytest.fail(
                f"{' '.join(cmd[2:])} exited {result.returncode}\n"
                f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}",
                pytrace=False,
            )
        return result

    return run


@pytest.fixture(scope="session")
def smoke_overrides_for(mnist_root: Path) -> Callable[[Path], list[str]]:
    """Overrides that point `configs/smoke.yaml` at the real data and at `run_dir`, with W&B off."""

    def make(run_dir: Path) -> list[str]:
        return [f"data.root={mnist_root}", f"run.dir={run_dir}", "log.wandb=disabled"]

    return make


@pytest.fixture
def smoke_overrides(tmp_path: Path, smoke_overrides_for: Callable[[Path], list[str]]) -> list[str]:
    return smoke_overrides_for(tmp_path / "run")
