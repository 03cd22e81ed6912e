"""Packaging: building the wheel and the editable install (`make install`) prints no warning of ours, and the
wheel holds the package, its bundled data and nothing else of the checkout."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A copy of what a build reads (setuptools writes build/ and *.egg-info into the source tree)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "gan_ddp", src / "gan_ddp", ignore=shutil.ignore_patterns("__pycache__"))
    (src / "tests").mkdir()  # a folder of the checkout that must not be packaged
    return src


@pytest.mark.parametrize("hook", ["build_wheel", "build_editable"])
def test_builds_are_quiet(source: Path, tmp_path: Path, hook: str) -> None:
    pytest.importorskip("setuptools", minversion="77")
    out = tmp_path / "dist"
    out.mkdir()
    # The PEP 517 hook pip calls, in this Python (its setuptools is the dev extra's, >= 77 like the build's).
    code = f"from setuptools import build_meta; print(build_meta.{hook}({str(out)!r}))"
    build = subprocess.run(
        [sys.executable, "-W", "default", "-c", code], cwd=source, capture_output=True, text=True, timeout=300
    )
    assert build.returncode == 0, build.stderr[-3000:]
    # Python warnings (what pip shows of a build: "BuildBackendWarning: Package ... is absent from the `packages`
    # configuration", deprecations); distutils' own log lines are pip's verbose output, not these.
    noise = re.findall(r"^.*\b\w*Warning\b.*$|^.*is absent from the .packages.*$", build.stderr, re.MULTILINE)
    assert not noise, "\n".join(noise)
    (wheel,) = out.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("tests/")]
    if hook == "build_wheel":
        assert (
            "gan_ddp/components/bundled/mnist/t10k-images-idx3-ubyte.gz" in names and "gan_ddp/tools/export.py" in names
        )
