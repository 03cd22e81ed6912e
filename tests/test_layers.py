"""The layer contract (pyproject.toml, [tool.importlinter]): the package keeps it, and an import that runs up a
layer breaks it, with a message that names the import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter")  # a dev dependency: `make install-dev`

REPO = Path(__file__).resolve().parents[1]
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the package under `root` (first on the path: that copy, not an installed one), with the
    contract of this checkout's pyproject.toml."""
    return subprocess.run(
        [sys.executable, "-c", LINT, "--config", str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])},
    )


def test_the_package_keeps_its_layers() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "KEPT" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    """A runtime module that imports the trainer (runtime sits four layers below training)."""
    shutil.copytree(REPO / "gan_ddp", tmp_path / "gan_ddp", ignore=shutil.ignore_patterns("__pycache__", "bundled"))
    fsutil = tmp_path / "gan_ddp" / "runtime" / "fsutil.py"
    fsutil.write_text(fsutil.read_text() + "\n\ndef _upward():\n    from gan_ddp.training import trainer  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
    assert "gan_ddp.runtime is not allowed to import gan_ddp.training" in result.stdout
    assert "gan_ddp.runtime.fsutil -> gan_ddp.training.trainer" in result.stdout
