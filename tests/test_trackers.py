"""log.trackers: TensorBoard and MLflow written by real trainings, read back with their own readers (TensorBoard's
event accumulator, MLflow's client on the run's file store); rank 0 only; a resumed run continues the same run;
a tracker whose package is missing is refused with one line naming it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from _runs import single, torchrun, train_cmd
from PIL import Image

from gan_ddp.commands import cli
from gan_ddp.config import ConfigError, LogConfig
from gan_ddp.runtime.tracking import MLFLOW_RUN_ID_FILE, TRACKERS, TrackerKind, flat_params

BOTH = "log.trackers=[tensorboard,mlflow]"
GRID = (4 * 30 + 2, 4 * 30 + 2)  # the smoke config's 16-sample grid: 4 x 4 images of 28 px, 2 px padding


def _tensorboard(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    return events.Reload()


def _mlflow(run_dir: Path):
    """(client, the one run of the gan-ddp experiment) in the run's own file store."""
    import os

    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("gan-ddp")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def _artifacts(client, run_id: str, path: str) -> list[str]:
    return sorted(Path(a.path).name for a in client.list_artifacts(run_id, path))


def _train(run_dir: Path, *overrides: str) -> None:
    result = single(train_cmd(run_dir, BOTH, "log.every=5", "log.sample_every=5", "log.plots=true", *overrides))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "disabled" not in result.stdout, result.stdout  # no tracker gave up


def test_tensorboard_and_mlflow_hold_scalars_grids_params_and_artifacts(tmp_path) -> None:
    run = tmp_path / "run"
    _train(run, "train.steps=10")

    tb = _tensorboard(run)
    assert [e.step for e in tb.Scalars("loss/d")] == [5, 10]
    assert [e.step for e in tb.Scalars("score/real")] == [5, 10]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [round(e.value, 5) for e in tb.Scalars("loss/g")] == [round(m["loss/g"], 5) for m in lines]
    grids = tb.Images("samples/grid")
    assert [e.step for e in grids] == [5, 10]
    assert Image.open(io.BytesIO(grids[-1].encoded_image_string)).size == GRID
    assert (
        Image.open(io.BytesIO(grids[-1].encoded_image_string)).size
        == Image.open(run / "samples/step_00000010.png").size
    )
    assert {"plots/losses", "plots/scores"} <= set(tb.Tags()["images"])

    client, mlrun = _mlflow(run)
    assert mlrun.info.run_id == (run / MLFLOW_RUN_ID_FILE).read_text().strip()
    assert mlrun.info.status == "FINISHED"
    params = mlrun.data.params
    assert params["model.arch"] == "mlp" and params["train.batch_size"] == "64"
    assert params["model.g_hidden"] == "[64, 128]" and params["resolved.data.split"] == "test"
    history = client.get_metric_history(mlrun.info.run_id, "loss/g")
    assert [(m.step, round(m.value, 5)) for m in history] == [(m["step"], round(m["loss/g"], 5)) for m in lines]
    assert _artifacts(client, mlrun.info.run_id, "samples") == [
        "progress.gif",
        "step_00000005.png",
        "step_00000010.png",
    ]
    assert _artifacts(client, mlrun.info.run_id, "plots") == ["losses.png", "scores.png"]


def test_a_resumed_run_continues_the_same_runs(tmp_path) -> None:
    run = tmp_path / "run"
    _train(run, "train.steps=10", "checkpoint.every=6")  # logs steps 5 and 10, checkpoints at 6 and 10
    run_id = (run / MLFLOW_RUN_ID_FILE).read_text()
    # Resumed from step 6: what the first session logged at step 10 is replaced by the second session's.
    _train(run, "train.steps=12", "checkpoint.every=6", f"train.resume={run / 'checkpoints' / 'step_00000006'}")
    assert (run / MLFLOW_RUN_ID_FILE).read_text() == run_id
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [5, 10, 12]

    tb = _tensorboard(run)  # one folder, both sessions' event files; purge_step hides the first session's 10
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert [(e.step, round(e.value, 5)) for e in tb.Scalars("loss/d")] == [
        (m["step"], round(m["loss/d"], 5)) for m in lines
    ]
    client, mlrun = _mlflow(run)  # one run, holding both sessions
    assert mlrun.info.run_id == run_id.strip()
    history = client.get_metric_history(run_id.strip(), "loss/d")
    assert [m.step for m in history] == [5, 10, 10, 12]  # MLflow keeps both values of step 10 (no rewriting)
    assert "step_00000010.png" in _artifacts(client, mlrun.info.run_id, "samples")


@pytest.mark.multiprocess
def test_only_rank_0_writes_to_the_trackers(tmp_path) -> None:
    run = tmp_path / "run"
    result = torchrun(2, train_cmd(run, BOTH, "log.every=5", "log.sample_every=5", "train.steps=10"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert [e.step for e in _tensorboard(run).Scalars("loss/d")] == [5, 10]  # once per step, not per rank
    client, mlrun = _mlflow(run)  # exactly one run
    assert [m.step for m in client.get_metric_history(mlrun.info.run_id, "loss/d")] == [5, 10]
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["world_size"] == 2


def test_a_missing_tracker_package_is_one_line_naming_it(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(
        TRACKERS._entries, "mlflow", TrackerKind("no_such_module_for_gan_ddp", "mlflow-skinny", "mlflow")
    )
    code = cli.main(train_cmd(tmp_path / "run", "log.trackers=[wandb,mlflow]"))
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: log.trackers: mlflow needs the mlflow-skinny package, which is not installed: "
        "pip install 'gan-ddp[mlflow]' (or leave mlflow out of log.trackers)"
    ]
    assert not (tmp_path / "run").exists()  # refused before anything started


def test_trackers_config() -> None:
    assert LogConfig().trackers == ["wandb"]
    with pytest.raises(
        ConfigError, match=r"log\.trackers: 'neptune' is not allowed; choose one of wandb, tensorboard, mlflow"
    ):
        LogConfig(trackers=["neptune"])
    with pytest.raises(ConfigError, match="twice"):
        LogConfig(trackers=["mlflow", "mlflow"])
    assert flat_params({"a": {"b": 1, "c": [1, 2], "d": None}, "e": "x"}) == {
        "a.b": 1,
        "a.c": "[1, 2]",
        "a.d": "null",
        "e": "x",
    }
