"""The one base class of every failure a user can act on.

A `GanDdpError` reaches the command line as one `error: <message>` line and the class's exit code, never a
traceback. Each module defines its own subclass beside the code that raises it (DataError in data.py,
CheckpointError in checkpoint.py, ...; ConfigError lives here, since the registries below the config raise
it too); the command line catches the base class, so it needs to know none of them.
Exit codes are listed in `gan_ddp.runtime.faults` and the README.
"""

from __future__ import annotations

EXIT_USAGE = 2


def one_line(exc: BaseException, named: bool = False, first_line: bool = False) -> str:
    """An exception's message on one line (libraries' messages often span several), for `error:` lines:
    all of it joined, or only its `first_line` (where the rest is a traceback or a hint of the library's own)."""
    text = str(exc).strip()
    text = " ".join((text.splitlines()[0] if first_line and text else text).split())
    if not text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {text}" if named else text


class GanDdpError(Exception):
    """A failure with a one-line message that names its culprit."""

    exit_code: int = EXIT_USAGE
    # True for errors every rank raises together (the same message N times): printed by global rank 0 only.
    all_ranks: bool = False


class MissingRunFileError(GanDdpError, FileNotFoundError):
    """A file a command reads from a run directory is not there (config.yaml, metrics, sample grids)."""


class ConfigError(GanDdpError, ValueError):
    """A bad configuration value; the message is one line that names the key."""


class UsageError(GanDdpError, ValueError):
    """A command's argument out of range, or arguments that do not go together (`--n must be > 0`, ...)."""
