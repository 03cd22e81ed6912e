"""Shared fixtures: the real MNIST t10k data, the test evaluator, command-line runners (a subprocess: `run_cli`; this
process: `cli`) and the smoke-run overrides; and how the suite is split between pytest-xdist workers
(`make test` runs `-n 3 --dist loadgroup`), one thread per process."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from _runs import EVALUATOR_EPOCHS

from gan_ddp.components.data import BUNDLED_DIR

REPO_ROOT = Path(__file__).resolve().parents[1]
MNIST_ROOT = BUNDLED_DIR
SMOKE_CONFIG = REPO_ROOT / "configs" / "smoke.yaml"

# pytest-xdist (`--dist loadgroup`) runs the tests of one group one after another in one worker:
# - the cluster and slurm tests use network namespaces under one name prefix, munged and slurmctld: never two at once;
# - a module whose tests share a module- or session-scoped run or evaluator keeps it in one worker, built once.
SERIAL_MARKERS = ("cluster", "slurm")
SHARED_FIXTURE_MODULES = (
    "test_cli",
    "test_demo",
    "test_evaluate",
    "test_export",
    "test_tracking",
    "test_untrusted_files",
)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups into the test ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    serial = []
    for item in items:
        if any(item.get_closest_marker(name) for name in SERIAL_MARKERS):
            item.add_marker(pytest.mark.xdist_group("cluster"))
            serial.append(item)
        elif getattr(item.module, "__name__", None) in SHARED_FIXTURE_MODULES:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    # Under `--dist loadgroup` (workers see it as option.loadgroup) the longest chain starts first; xdist keeps this
    # order with --no-loadscope-reorder.
    if getattr(config.option, "loadgroup", False):
        first = set(map(id, serial))
        items[:] = serial + [item for item in items if id(item) not in first]


# Under pytest-xdist the workers share the CPU cores: one intra-op thread per process, in the workers and in the
# processes they start (OMP_NUM_THREADS is torch's default), else OpenMP threads spin against each other and a
# test takes several times as long as alone. Trainings take it from configs/smoke.yaml's `train.threads: 1`.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_configure(config: pytest.Config) -> None:
    """The known breakage of --dist loadgroup (pytest-xdist#1386: pytest 9.2 with pytest-xdist <= 3.8), refused with
    one line before any worker starts; `pytest_collection_finish` below catches any other way groups get lost."""
    if getattr(config.option, "dist", "no") != "loadgroup":
        return
    import xdist
    from packaging.version import Version

    if Version(pytest.__version__) >= Version("9.2") and Version(xdist.__version__) <= Version("3.8.0"):
        raise pytest.UsageError(
            f"pytest {pytest.__version__} with pytest-xdist {xdist.__version__} ignores --dist loadgroup "
            "(pytest-xdist#1386): install the stack's pins (launch/stacks/*.txt: pytest 9.1.1) or run serially "
            "(make test XDIST=)"
        )


def pytest_collection_finish(session: pytest.Session) -> None:
    """After every plugin's collection hooks, pytest-xdist's included (it turns a worker's groups into node-id
    suffixes): grouped tests without the `@group` suffix would run the cluster tests on both workers at once (two
    simulated clusters racing for namespaces) and rebuild shared runs per test. Stop with one line instead."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    lost = [item.nodeid for item in session.items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if lost:
        raise pytest.UsageError(
            f"pytest-xdist --dist loadgroup is not grouping ({lost[0]} has no @group suffix; pytest-xdist#1386, "
            "pytest 9.2): install the stack's pins (launch/stacks/*.txt) or run serially (make test XDIST=)"
        )


# Variables that would make a child believe it is one rank of a distributed job, or force colour output.
_SCRUBBED = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "FORCE_COLOR")


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """Folder with the real MNIST t10k IDX files (10,000 images), bundled in the package."""
    return MNIST_ROOT


@pytest.fixture(scope="session")
def evaluator_cache(tmp_path_factory: pytest.TempPathFactory, mnist_root: Path) -> Path:
    """A cache folder holding the test evaluator (CNN, seed 0, 3 epochs on the bundled split), trained once per
    test run: under pytest-xdist by the first worker that asks, while the others wait on a lock and then find it
    cached (a deterministic training: the same weights whoever trains it). Treat it as read-only: copy it
    (`evaluator_cache_copy`) to write real statistics or other evaluators beside it."""
    from gan_ddp.evaluation.evaluator import RealData, load_or_train_evaluator

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker has its own basetemp under the run's shared one
        root = root.parent
    cache = root / f"evaluator-cnn-{EVALUATOR_EPOCHS}-epochs"
    with open(root / f"{cache.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        load_or_train_evaluator(RealData.load("mnist", mnist_root, "test"), cache, epochs=EVALUATOR_EPOCHS, log=None)
    return cache


@pytest.fixture(scope="session")
def evaluator_cache_copy(evaluator_cache: Path) -> Callable[[Path], Path]:
    """`evaluator_cache_copy(folder)`: a writable copy of `evaluator_cache` at `folder`."""

    def copy(folder: Path) -> Path:
        shutil.copytree(evaluator_cache, folder)
        return folder

    return copy


def _cli_env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _fail_unless_ok(result: subprocess.CompletedProcess, command: str) -> None:
    """Fail the test, showing the command's output, when it exited non-zero (`run_cli` and `cli` with `check`)."""
    if result.returncode != 0:
        pytest.fail(
            f"{command} exited {result.returncode}\n"
            f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., subprocess.CompletedProcess]:
    """`run_cli(*args, env=None, check=True)`: `python -m gan_ddp *args` in the repo root, text output.

    `env` adds variables to (a cleaned copy of) os.environ. With `check`, a non-zero exit fails the test
    and shows the child's output."""

    def run(*args: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 300):
        cmd = [sys.executable, "-m", "gan_ddp", *map(str, args)]
        result = subprocess.run(cmd, cwd=REPO_ROOT, env=_cli_env(env), capture_output=True, text=True, timeout=timeout)
        if check:
            _fail_unless_ok(result, " ".join(cmd[2:]))
        return result

    return run


@pytest.fixture(scope="session")
def cli() -> Callable[..., subprocess.CompletedProcess]:
    """`cli(*args, check=True)`: `gan-ddp *args` through `gan_ddp.commands.cli.main` in THIS process, from the
    repo root, stdout and stderr captured, the exit code as `returncode` (a CompletedProcess like `run_cli`'s).

    For commands whose interpreter start-up proves nothing (sample, interpolate, plot, eval, the one-line errors):
    it saves the 2-3 s of importing torch per call. `run_cli` stays for what needs a process of its own: the
    entry points, signals, environment variables, a training's end-to-end output."""
    from _runs import cli_inproc

    def run(*args: object, check: bool = True) -> subprocess.CompletedProcess:
        result = cli_inproc(*args)
        if check:
            _fail_unless_ok(result, " ".join(result.args[1:]))
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
