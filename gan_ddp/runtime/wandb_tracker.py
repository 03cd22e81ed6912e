"""Weights & Biases on the main process, through Accelerate's `WandBTracker` (`log.trackers: [wandb]`, the default).

Only the main process builds an active `Tracker`; every other rank passes `enabled=False` and the object
does nothing at all (wandb is never imported there). wandb and Accelerate's tracker are imported lazily,
inside methods, so `import gan_ddp.runtime.wandb_tracker` stays cheap.

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

import netrc
import os
import secrets
import string
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gan_ddp.config import WANDB_MODES
from gan_ddp.errors import ConfigError, one_line

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
