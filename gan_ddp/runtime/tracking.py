"""Rank-0 experiment tracking through Accelerate's trackers, isolated from training: `log.trackers` chooses
among W&B (`WandBTracker`, the default), TensorBoard (`TensorBoardTracker`) and MLflow (`MLflowTracker`);
`open_trackers` starts the chosen ones and `Trackers` fans every call out to them. Each is off for good after
its first failure (one warning, training continues). A chosen tracker whose package is missing is refused
before training starts (`check_installed`: one line naming the package).

TensorBoard: event files in `<run_dir>/tensorboard/` (scalars, grids and plots as images, the config as
hparams); a resumed run writes into the same folder with `purge_step`, so TensorBoard hides what the
interrupted session logged past the checkpoint. MLflow: `$MLFLOW_TRACKING_URI` when set, else a local file
store in `<run_dir>/mlruns/` (`mlflow ui --backend-store-uri <run_dir>/mlruns`); the config as params, every
metrics line, grids, plots and the GIF as artifacts; the run id lives in `<run_dir>/mlflow_run_id.txt`, so a
resumed training continues the same MLflow run.

W&B's mode resolution, credentials and run (`Tracker`) live in `wandb_tracker`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gan_ddp.errors import ConfigError, one_line
from gan_ddp.registry import Registry
from gan_ddp.runtime.wandb_tracker import Tracker


# ------------------------------------------------------------------------------------------ the trackers
@dataclass(frozen=True)
class TrackerKind:
    """One value of `log.trackers`: the package it needs and the gan-ddp extra that installs it."""

    module: str  # import name
    package: str  # pip name
    extra: str | None  # `pip install 'gan-ddp[extra]'`; None: a dependency of gan-ddp itself


TRACKERS: Registry[TrackerKind] = Registry("log.trackers")
TRACKERS.add("wandb", TrackerKind("wandb", "wandb", None))
TRACKERS.add("tensorboard", TrackerKind("tensorboard", "tensorboard", "tensorboard"))
TRACKERS.add("mlflow", TrackerKind("mlflow", "mlflow-skinny", "mlflow"))
MLFLOW_RUN_ID_FILE = "mlflow_run_id.txt"


class TrackerMissingError(ConfigError):
    """A tracker in log.trackers whose package is not installed (every rank says the same)."""

    all_ranks = True


def check_installed(names: list[str]) -> None:
    """Refuse, with one line naming what to install, a chosen tracker whose package this Python lacks."""
    for name in names:
        kind = TRACKERS[name]
        if importlib.util.find_spec(kind.module) is None:
            how = f"pip install 'gan-ddp[{kind.extra}]'" if kind.extra else f"pip install {kind.package}"
            raise TrackerMissingError(
                f"log.trackers: {name} needs the {kind.package} package, which is not installed: {how} "
                f"(or leave {name} out of log.trackers)"
            )


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """A nested config as dotted keys with scalar values (lists as JSON, None as "null"): what TensorBoard's
    hparams and MLflow's params take."""
    out: dict[str, str | int | float | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_params(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value, default=str)
    return out


class _AccelerateTracker:
    """One of Accelerate's file-writing trackers on the main process; a no-op elsewhere and after any failure."""

    label = ""

    def __init__(self, run_dir: Path, config: dict, enabled: bool, warn: Callable[[str], None], **kw: Any) -> None:
        self.run_dir = Path(run_dir)
        self.active = False
        self._tracker: Any = None
        self._warn = warn
        self._warned = False
        if not enabled:
            return
        try:
            self._start(config, **kw)
            self.active = True
        except Exception as exc:
            self._fail(exc)

    def _start(self, config: dict, **kw: Any) -> None:
        raise NotImplementedError

    def _fail(self, exc: BaseException) -> None:
        self.active = False
        if not self._warned:
            self._warned = True
            self._warn(f"{self.label} disabled: {one_line(exc, named=True, first_line=True)}; training continues")

    def _call(self, fn: Callable[[], Any]) -> None:
        if not self.active:
            return
        try:
            fn()
        except Exception as exc:
            self._fail(exc)

    def log(self, metrics: dict[str, float | int], step: int) -> None:
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._call(lambda: self._tracker.log(numbers, step=int(step)))

    def log_image(self, key: str, path: Path, step: int, caption: str | None = None) -> None:
        self._call(lambda: self._image(key, Path(path), int(step)))

    def log_video(self, key: str, path: Path, step: int) -> None:
        self._call(lambda: self._file(key, Path(path), int(step)))

    def _image(self, key: str, path: Path, step: int) -> None:
        raise NotImplementedError

    def _file(self, key: str, path: Path, step: int) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        if self._tracker is not None:
            self._call(self._tracker.finish)
        self.active = False
        self._tracker = None


class TensorBoard(_AccelerateTracker):
    """Accelerate's `TensorBoardTracker`, writing `<run_dir>/tensorboard/`."""

    label = "TensorBoard"

    def _start(self, config: dict, start_step: int = 0, **_: Any) -> None:
        from accelerate.tracking import TensorBoardTracker

        # purge_step: on resume, TensorBoard hides the events the interrupted session wrote past the checkpoint.
        kwargs = {"purge_step": start_step + 1} if start_step else {}
        tracker = TensorBoardTracker("tensorboard", str(self.run_dir), **kwargs)
        tracker.start()
        self._tracker = tracker
        if not start_step:  # hparams once per run (each call adds an hparams sub-run)
            tracker.store_init_configuration(flat_params(config))

    def _image(self, key: str, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))[None]  # (1, H, W, 3) uint8
        self._tracker.log_images({key: pixels}, step=step, dataformats="NHWC")
        self._tracker.writer.flush()


class MLflow(_AccelerateTracker):
    """Accelerate's `MLflowTracker`: `$MLFLOW_TRACKING_URI`, else a file store in `<run_dir>/mlruns/`."""

    label = "MLflow"

    def _start(self, config: dict, project: str = "gan-ddp", name: str | None = None, **_: Any) -> None:
        import mlflow
        from accelerate.tracking import MLflowTracker

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # The run's own file store: no server, no database, everything beside the run. MLflow 3.x keeps
            # that backend working but in "maintenance mode", refused unless opted into explicitly.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((self.run_dir / "mlruns").resolve().as_uri())
        id_file = self.run_dir / MLFLOW_RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else None
        tracker = MLflowTracker(experiment_name=project, run_id=run_id or None, run_name=name)
        tracker.start()
        self._tracker = tracker
        if not run_id:
            id_file.write_text(tracker.active_run.info.run_id + "\n")
        # MLflow refuses to change a logged param: a resumed run adds only the keys it has not logged yet.
        logged = mlflow.get_run(tracker.active_run.info.run_id).data.params
        tracker.store_init_configuration({k: v for k, v in flat_params(config).items() if k not in logged})

    def _image(self, key: str, path: Path, step: int) -> None:
        self._file(key, path, step)

    def _file(self, key: str, path: Path, step: int) -> None:
        self._tracker.log_artifact(str(path), artifact_path=key.split("/")[0])  # samples/, plots/

    def finish(self, exit_code: int = 0) -> None:
        if self._tracker is not None and exit_code:
            import mlflow

            self._call(lambda: mlflow.end_run(status="FAILED"))
        super().finish(exit_code)


class Trackers:
    """The chosen trackers as one: every call goes to each (each isolates its own failures)."""

    def __init__(self, trackers: list[Any]) -> None:
        self.trackers = trackers

    @property
    def active(self) -> bool:
        return any(t.active for t in self.trackers)

    def log(self, metrics: dict[str, float | int], step: int) -> None:
        for t in self.trackers:
            t.log(metrics, step)

    def log_image(self, key: str, path: Path, step: int, caption: str | None = None) -> None:
        for t in self.trackers:
            t.log_image(key, path, step, caption=caption)

    def log_video(self, key: str, path: Path, step: int) -> None:
        for t in self.trackers:
            t.log_video(key, path, step)

    def finish(self, exit_code: int = 0) -> None:
        for t in self.trackers:
            t.finish(exit_code)


def open_trackers(
    log: Any, run_dir: Path, config: dict, enabled: bool, warn: Callable[[str], None] = print, start_step: int = 0
) -> Trackers:
    """Start the trackers `log.trackers` names (`log`: the config's LogConfig) on the main process (`enabled`);
    `start_step`: the step a resumed run continues from (0 for a new run)."""
    if not enabled:
        return Trackers([])
    started: list[Any] = []
    for name in log.trackers:
        if name == "wandb":
            identity = {"entity": log.entity, "name": log.name, "group": log.group, "tags": list(log.tags)}
            started.append(
                Tracker(log.wandb, log.project, **identity, run_dir=run_dir, config=config, enabled=True, warn=warn)
            )
        elif name == "tensorboard":
            started.append(TensorBoard(run_dir, config, True, warn, start_step=start_step))
        elif name == "mlflow":
            started.append(MLflow(run_dir, config, True, warn, project=log.project, name=log.name))
    return Trackers(started)
