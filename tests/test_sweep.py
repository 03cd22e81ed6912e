"""launch/sweep.yaml offline: the command line a W&B agent builds for a trial (with wandb's own helpers) goes
through launch/run.sh, and our CLI accepts it: the config loads, the sweep's values apply, and each trial
gets its own run directory."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest
import yaml
from _runs import REPO

from gan_ddp.commands.cli import build_parser
from gan_ddp.config import load_config

sweep_utils = pytest.importorskip("wandb.sdk.launch.sweeps.utils")

SWEEP = yaml.safe_load((REPO / "launch" / "sweep.yaml").read_text())


def _trial_values(index: int) -> dict[str, object]:
    """One point of the search space per index: categorical values in turn, distributions at either end."""
    values = {}
    for name, spec in SWEEP["parameters"].items():
        if "values" in spec:
            values[name] = spec["values"][index % len(spec["values"])]
        else:
            values[name] = spec["min"] if index % 2 == 0 else spec["max"]
    return values


def _agent_command(values: dict[str, object]) -> list[str]:
    """What `wandb agent` runs (wandb_agent.Agent._command_run): its macros expanded from wandb's helpers."""
    command = sweep_utils.create_sweep_command(list(SWEEP["command"]))
    macros = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    macros.update(env=["/usr/bin/env"], interpreter=["python"], program=[SWEEP["program"]])
    out: list[str] = []
    for item in map(str, command):
        out += macros.get(item[2:-1]) or [] if item.startswith("${") and item.endswith("}") else [item]
    return out


def test_sweep_definition():
    assert SWEEP["metric"] == {"name": "eval/fid", "goal": "minimize"}
    assert SWEEP["method"] in ("bayes", "random", "grid")
    assert "${args_no_hyphens}" in SWEEP["command"]
    assert (REPO / SWEEP["program"]).is_file()
    # Every parameter is a key of our config (load_config names unknown keys; this checks them all at once).
    load_config(REPO / "configs" / "mnist_mlp.yaml", [f"{k}={v}" for k, v in _trial_values(0).items()])


# Enough trials that every categorical value, and both ends of every range, are tried.
TRIALS = max(2, *(len(spec.get("values", ())) for spec in SWEEP["parameters"].values()))


@pytest.mark.parametrize("index", range(TRIALS))
def test_agent_command_runs_our_cli_with_the_trials_values(index, monkeypatch):
    values = _trial_values(index)
    command = _agent_command(values)
    assert command[:3] == ["/usr/bin/env", "bash", "launch/run.sh"]
    env = {k: v for k, v in os.environ.items() if k not in ("NGPUS", "WORLD_SIZE", "RANK", "CUDA_VISIBLE_DEVICES")}
    env.update(DRY_RUN="1", PYTHON=sys.executable, WANDB_SWEEP_ID="sw33p", WANDB_RUN_ID=f"trial{index}")
    out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    # The trainer's arguments as launch/run.sh passes them on (after `-m gan_ddp`).
    argv = shlex.split(out.stderr.split("[launch] would run: ")[1].splitlines()[0])
    argv = argv[argv.index("gan_ddp") + 1 :]
    args = build_parser().parse_args(argv)
    assert args.command == "train"

    monkeypatch.setenv("WANDB_SWEEP_ID", "sw33p")
    monkeypatch.setenv("WANDB_RUN_ID", f"trial{index}")
    cfg = load_config(REPO / args.config, args.overrides).to_dict()
    assert cfg["run"]["dir"] == f"runs/sweep-sw33p/trial{index}"  # its own directory per trial
    assert cfg["eval"]["every"] and cfg["log"]["wandb"] == "online"  # eval/fid is produced and reaches W&B
    for key, value in values.items():
        section, name = key.split(".")
        expected = pytest.approx(value) if isinstance(value, float) else value
        assert cfg[section][name] == expected, key
