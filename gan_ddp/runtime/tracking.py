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

W&B in detail:

Only the main process builds an active `Tracker`; every other rank passes `enabled=False` and the object
does nothing at all (wandb is never imported there). wandb and Accelerate's tracker are imported lazily,
inside methods, so `import gan_ddp.runtime.tracking` stays cheap.

Modes (`log.wandb`): "disabled"; "offline" (files only, `wandb sync` later); "online"; "auto" = online
when credentials are configured (`WANDB_API_KEY`, `WANDB_IDENTITY_TOKEN_FILE`, or a `.netrc` entry for the
W&B host), else offline with one warning. With "auto" an explicit `WANDB_MODE` env var wins. A resolved
"online" without any credentials also falls back to offline (with the same warning): otherwise
`wandb.init` would open an interactive login prompt on a terminal and hold rank 0 while the other ranks
wait in a collective.

Files go to `<run_dir>/wandb/` (offline: `offline-run-<time>-<id>/` with `run-<id>.wandb`, `files/media/`).
The run id lives in `<run_dir>/wandb_run_id.txt`, so a resumed training continues the same W&B run
(`resume="allow"`; offline, each resume writes one more `offline-run-*-<id>` directory with the same id,
and `wandb sync` appends them to one run).

Failure isolation: any exception from import, init, log or finish is reported once via `warn` as
`W&B disabled: <Type>: <first line>; training continues`, and the tracker goes inactive for good (no retry
per step). `wandb.init` is bounded by `init_timeout` in online mode.

Accelerate's `WandBTracker` logs through `accelerate.logging`, which raises unless the Accelerate state
exists, so build the `Tracker` after the `Accelerator` (this module checks and otherwise disables W&B).
"""

from __future__ import annotations

import importlib.util
import json
import netrc
import os
import secrets
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gan_ddp.config import WANDB_MODES
from gan_ddp.errors import ConfigError, one_line
from gan_ddp.registry import Registry

RUN_ID_FILE = "wandb_run_id.txt"
DEFAULT_BASE_URL = "https://api.wandb.ai"
INIT_TIMEOUT_S = 90.0
# What `WANDB_MODE` may say (wandb's own spellings) and what each means here.
_ENV_MODES = {
    "online": "online",
    "run": "online",
    "shared": "online",
    "offline": "offline",
    "dryrun": "offline",
    "disabled": "disabled",
}


def new_run_id(length: int = 8) -> str:
    """A W&B-style run id: random base-36 (wandb 0.31 dropped `wandb.util.generate_id`)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def _netrc_path(environ: Mapping[str, str], home: Path) -> Path:
    # Same lookup order as wandb (wbauth.wbnetrc): $NETRC, ~/.netrc, ~/_netrc.
    if environ.get("NETRC"):
        return Path(environ["NETRC"]).expanduser()
    for name in (".netrc", "_netrc"):
        if (home / name).exists():
            return home / name
    return home / ".netrc"


def has_credentials(environ: Mapping[str, str], home: Path) -> bool:
    """Whether W&B credentials are configured, without importing wandb, prompting or using the network."""
    if environ.get("WANDB_API_KEY") or environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL).netloc
    if not host:
        return False
    try:
        creds = netrc.netrc(str(_netrc_path(environ, home))).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(creds and creds[2])


def offline_warning(run_dir: Path | str) -> str:
    return (
        f"W&B: no credentials found, logging offline to {run_dir}; "
        f"upload later with `wandb sync {run_dir}/wandb/offline-run-*`"
    )


def resolve_mode(
    mode: str, environ: Mapping[str, str], home: Path, run_dir: Path | str = "<run_dir>"
) -> tuple[str, str | None]:
    """Decide the effective mode: ("online" | "offline" | "disabled", warning line or None).

    "auto": `WANDB_MODE` if set, else online with credentials and offline (with a warning) without.
    An explicit "online"/"offline"/"disabled" is kept, except online without credentials -> offline.
    Raises ConfigError (a ValueError) for an unknown `mode` or `WANDB_MODE`.
    """
    if mode not in WANDB_MODES:
        raise ConfigError(f"log.wandb: {mode!r} is not allowed; choose one of {', '.join(WANDB_MODES)}")
    if mode == "auto" and environ.get("WANDB_MODE"):
        env_mode = environ["WANDB_MODE"].strip().lower()
        if env_mode not in _ENV_MODES:
            raise ConfigError(f"WANDB_MODE={environ['WANDB_MODE']!r} is not one of {', '.join(_ENV_MODES)}")
        mode = _ENV_MODES[env_mode]
    if mode in ("disabled", "offline"):
        return mode, None
    # "auto" without WANDB_MODE, or "online".
    if has_credentials(environ, home):
        return "online", None
    return "offline", offline_warning(run_dir)


class Tracker:
    """W&B run on the main process; a no-op everywhere else and after any failure."""

    def __init__(
        self,
        mode: str,
        project: str,
        entity: str | None,
        name: str | None,
        group: str | None,
        tags: list[str],
        run_dir: Path,
        config: dict,
        enabled: bool,
        warn: Callable[[str], None] = print,
    ) -> None:
        self.run_id: str | None = None
        self.active = False
        self.mode = "disabled"  # the resolved mode
        self.run_dir = Path(run_dir)
        self._warn = warn
        self._warned = False
        self._tracker: Any = None  # accelerate.tracking.WandBTracker once started
        self._finished = False
        if not enabled or mode == "disabled":
            return
        identity = {"entity": entity, "name": name, "group": group, "tags": list(tags) or None, "config": config}
        try:
            self._start(mode, project, identity)
        except Exception as exc:  # any failure: W&B off, training on
            self._fail(exc)

    # -- setup ------------------------------------------------------------------------------------------
    def _start(self, mode: str, project: str, identity: dict[str, Any]) -> None:
        """`identity`: entity, name, group, tags and config, passed on to wandb.init."""
        resolved, warning = resolve_mode(mode, os.environ, Path.home(), run_dir=self.run_dir)
        if resolved == "disabled":
            return
        from accelerate.state import PartialState

        if not getattr(PartialState, "_shared_state", None):
            raise RuntimeError(
                "Accelerate state not initialised: create the Accelerator before the Tracker "
                "(accelerate.tracking logs through accelerate.logging)"
            )
        if warning:
            self._warn(warning)
        self.mode = resolved

        import wandb
        from accelerate.tracking import WandBTracker

        self.run_dir.mkdir(parents=True, exist_ok=True)
        id_file = self.run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else ""
        if not run_id:
            # A W&B sweep agent names each trial's run in WANDB_RUN_ID: another id would leave the trial empty.
            run_id = os.environ.get("WANDB_RUN_ID") or new_run_id()
            # Written before init, so a crash inside init still leaves the id for the resumed run.
            id_file.write_text(run_id + "\n")

        settings = wandb.Settings(
            console="off",  # no stdout/stderr capture: it fights rich's live display
            silent=True,  # no banner or per-run chatter on the console
            init_timeout=INIT_TIMEOUT_S,  # a network problem fails init (-> offline warning), no hang
            reinit="finish_previous",  # default would hand back a still-open earlier run of this process
        )
        # WandBTracker(run_name=...) is the *project*; everything else is passed to wandb.init. It is lazy:
        # wandb.init runs in start(). main_process_only is False on this class, so it does no rank check of
        # its own (rank selection is `enabled`); its accelerate.logging calls need the state checked above.
        # init's config is applied with allow_val_change, so a resume may change it.
        tracker = WandBTracker(
            project,
            **identity,
            dir=str(self.run_dir),  # W&B appends wandb/
            id=run_id,
            resume="allow",
            mode=resolved,
            settings=settings,
        )
        tracker.start()
        self._tracker = tracker
        self.run_id = tracker.run.id
        self.active = True

    def _fail(self, exc: BaseException) -> None:
        self.active = False
        if not self._warned:
            self._warned = True
            self._warn(f"W&B disabled: {one_line(exc, named=True, first_line=True)}; training continues")

    # -- logging ----------------------------------------------------------------------------------------
    # Steps must increase: W&B merges calls with the same step into one row and drops (with its own warning,
    # silenced here) a step below the last one logged in this run, e.g. after resuming from a checkpoint older
    # than the last logged step. That loses those points but never raises.
    def log(self, metrics: dict[str, float | int], step: int) -> None:
        if not self.active:
            return
        try:
            self._tracker.log(dict(metrics), step=int(step))  # "loss/d": W&B panels group by the prefix
        except Exception as exc:
            self._fail(exc)

    def log_image(self, key: str, path: Path, step: int, caption: str | None = None) -> None:
        if not self.active:
            return
        try:
            import wandb

            self._tracker.log({key: wandb.Image(str(path), caption=caption)}, step=int(step))
        except Exception as exc:
            self._fail(exc)

    def log_video(self, key: str, path: Path, step: int) -> None:
        """A GIF file as wandb.Video (a file path needs no moviepy); wandb.Image if Video rejects it."""
        if not self.active:
            return
        try:
            import wandb

            try:
                media = wandb.Video(str(path), format="gif")
            except (ImportError, ValueError):
                media = wandb.Image(str(path))
            self._tracker.log({key: media}, step=int(step))
        except Exception as exc:
            self._fail(exc)

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (also after a logging failure, best effort); idempotent, never raises."""
        if self._finished or self._tracker is None:
            self._finished = True
            self.active = False
            return
        self._finished = True
        was_active, self.active = self.active, False
        try:
            # WandBTracker.finish() takes no exit code; its run does (non-zero marks the run failed).
            self._tracker.run.finish(exit_code=exit_code)
        except Exception as exc:
            if was_active:
                self._fail(exc)


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
