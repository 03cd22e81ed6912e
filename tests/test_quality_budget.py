"""`launch/quality_budget.sh`, the script behind docs/quality.md's FID-over-time tables, end to end at toy size."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _runs import REPO as REPO_ROOT
from omegaconf import OmegaConf

import gan_ddp.evaluation.evaluator as evr

pytestmark = pytest.mark.slow

RUNS = ("mnist_mlp", "mnist_dcgan", "mnist_quality", "mnist_conditional")


def test_quality_budget_trains_scores_and_tabulates(mnist_root: Path, tmp_path: Path, evaluator_cache_copy) -> None:
    out, budget = tmp_path / "q", 4
    cache = evaluator_cache_copy(tmp_path / "cache")  # the test CNN evaluator (conftest), where the script will look
    real = evr.RealData.load("mnist", mnist_root, "test")
    evr.load_or_train_evaluator(real, cache, epochs=1, log=None, kind="mlp")  # one epoch: toy-size scores
    gan = Path(sys.executable).with_name("gan-ddp")
    assert gan.is_file(), f"{gan}: the package's console script is not installed beside this python"
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")},
        "GAN_DDP": str(gan),
        "PYTHON": sys.executable,
        "GAN_DDP_CACHE": str(cache),
        "N_SAMPLES": "400",
        "POINTS": "2",
    }
    # log.every=1: every step's time_s is in metrics.jsonl, so the test can check when each run stopped.
    # train.threads=1: as every training in the suite (conftest), so the test can share the cores with others.
    overrides = [f"data.root={mnist_root}", "data.split=test", "log.every=1", "train.threads=1"]
    cmd = ["bash", "launch/quality_budget.sh", str(out), str(budget), *overrides]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(rf"^machine: .+, \d+ cores, flags: .+; budget {budget} s per run$", proc.stdout, re.M), (
        proc.stdout[:500]
    )

    for name in RUNS:
        assert (out / name / "BUDGET_DONE").is_file()
        config = OmegaConf.load(out / name / "config.yaml")
        assert config.train.max_seconds == budget and config.eval.every is None  # no evaluation spends the budget
        for evaluator in ("cnn", "mlp"):
            scored = json.loads((out / f"{name}.{evaluator}.json").read_text())
            assert scored["rows"], name
        # The budget ended the run, whatever the machine's load: it stopped within one step of the budget (the
        # step before the last ended before the budget ran out; the trainer checks after every step, and may
        # stop earlier, keeping time for its checkpoint), and its last checkpoint is that last step. No
        # wall-clock slack: a loaded machine makes steps slower, not this check looser.
        steps = [m for m in map(json.loads, (out / name / "metrics.jsonl").read_text().splitlines()) if "loss/d" in m]
        assert [m["step"] for m in steps] == list(range(1, len(steps) + 1)), name
        assert steps and (len(steps) == 1 or steps[-2]["time_s"] < budget), (name, steps[-2:])
        rows = json.loads((out / f"{name}.cnn.json").read_text())["rows"]
        assert rows[-1]["step"] == steps[-1]["step"], name
    snapshots = sorted((out / "textbook").glob("t*.npz"))
    # POINTS=2: one snapshot half-way, the last once the training time reached the budget (named by that time,
    # which on a loaded machine can be a step past it: checked against the loop's own log, not the clock).
    log = [json.loads(line) for line in (out / "textbook" / "log.jsonl").read_text().splitlines()]
    assert len(snapshots) == len(log) == 2 and log[0]["time_s"] < budget <= log[-1]["time_s"], log
    assert snapshots[-1].name == f"t{round(log[-1]['time_s']):05d}.npz", (snapshots, log)
    for p in snapshots:
        for evaluator in ("cnn", "mlp"):
            assert json.loads(p.with_suffix(f".{evaluator}.json").read_text())["eval/n"] == 400

    # One table per evaluator, one row per config, the budget column filled: "FID (classes)".
    for evaluator in ("cnn", "mlp"):
        table = proc.stdout.split(f"{evaluator} evaluator: FID")[1].split("evaluator: FID")[0]
        for name in (*RUNS, "textbook loop"):
            row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
            assert re.search(r"\| \d+\.\d \(\d+\) \|$", row), row

    # One "every metric" table per evaluator: KID, precision and recall for every config; the agreement
    # with the requested class for the conditional one only.
    for evaluator in ("cnn", "mlp"):
        table = proc.stdout.split(f"{evaluator} evaluator: every metric at the budget")[1].split("evaluator: FID")[0]
        for name in RUNS:
            row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert re.fullmatch(r"-?\d+\.\d\d ± \d+\.\d\d", cells[3]), row  # KID
            assert all(0 <= float(c) <= 1 for c in cells[4:6]), row  # precision, recall
            conditional = re.fullmatch(r"\d+\.\d% \(\d+\.\d%\)", cells[7])
            assert bool(conditional) == (name == "mnist_conditional"), row


@pytest.mark.parametrize(
    ("configs", "culprit"), [("mnist_quality bogus", "unknown run 'bogus'"), ("textbook", "add one (e.g. mnist_mlp)")]
)
def test_quality_budget_refuses_a_run_list_it_cannot_score(tmp_path: Path, configs: str, culprit: str) -> None:
    """CONFIGS picks the runs (e.g. the recommended config alone); a bad list stops before any training."""
    env = {**os.environ, "CONFIGS": configs, "GAN_DDP": "/bin/false"}
    proc = subprocess.run(
        ["bash", "launch/quality_budget.sh", str(tmp_path / "q"), "5"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: CONFIGS: ") and proc.stderr.count("\n") == 1 and culprit in proc.stderr
    assert not (tmp_path / "q").exists()  # nothing trained, nothing written
