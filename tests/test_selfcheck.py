"""launch/gpu_selfcheck.sh: refuses (exit 2, after the doctor) where torch sees no GPU; with ALLOW_CPU=1 it
runs all its steps here and writes one report with every section (checks the script, not a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "gpu_selfcheck.sh"


def run(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    report = tmp_path / "report.md"
    full = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    full |= {"PYTHON": sys.executable, "REPORT": str(report), "OMP_NUM_THREADS": "1", **env}
    result = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=full, capture_output=True, text=True, timeout=600)
    return result, report


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal; a GPU is visible here")
def test_refuses_without_a_gpu(tmp_path):
    result, report = run(tmp_path)
    assert result.returncode == 2
    assert "kernels for" in result.stderr  # the doctor's report first
    assert result.stderr.strip().splitlines()[-1].startswith("gpu_selfcheck.sh: torch sees no CUDA GPU here")
    assert not report.exists()


@pytest.mark.slow
def test_writes_one_report_with_every_step(tmp_path, mnist_root):
    env = dict(CONFIGS="configs/smoke.yaml", VARIANTS="eager", WARMUP="1", ITERS="3", REPEAT="1", ALLOW_CPU="1")
    result, report = run(tmp_path, DATA_ARGS=f"data.root={mnist_root} data.split=test", **env)
    assert result.returncode == 0, result.stderr[-3000:]
    text = report.read_text()
    for heading in ("## gan-ddp doctor", "## pytest -m cuda", "## gan-ddp bench", "## bench summary"):
        assert heading in text
    assert "kernels for" in text and "### smoke, eager" in text
    summary = text.split("## bench summary")[1]
    row = next(line for line in summary.splitlines() if line.startswith("smoke"))
    assert row.split()[:3] == ["smoke", "eager", "no"] and row.split()[-1].endswith("x")
    assert text.rstrip().endswith("**All steps passed.**")


def test_deadline_leaves_out_the_benches_and_says_so(tmp_path, mnist_root):
    # DEADLINE_S=0: the doctor and the (here skipped) GPU tests run, no bench starts, and the report still ends
    # with the summary section and names every bench it left out.
    env = dict(CONFIGS="configs/smoke.yaml configs/mnist_mlp.yaml", VARIANTS="eager compile", ALLOW_CPU="1")
    result, report = run(tmp_path, DATA_ARGS=f"data.root={mnist_root} data.split=test", DEADLINE_S="0", **env)
    assert result.returncode == 0, result.stderr[-3000:]
    text = report.read_text()
    assert "## bench summary" in text and "### smoke, eager: not run (DEADLINE_S=0" in text
    left_out = text.split("**Not run (deadline):** ")[1].splitlines()[0].split(",")
    assert left_out == [f"bench {c} {v}" for c in ("smoke", "mnist_mlp") for v in ("eager", "compile")]
    assert text.rstrip().endswith("**All steps that ran passed.**")
