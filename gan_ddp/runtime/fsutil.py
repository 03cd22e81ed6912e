"""Writing a file so that no reader ever sees half of it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` fills a temporary sibling of `path`, which is flushed to disk and renamed over `path`.

    A reader (another process, a resumed run) sees the old file or the new one, never a partial one; a crash
    or an error leaves `path` as it was and no temporary behind. The temporary's name carries the process id,
    so processes writing the same file at once (two runs filling one evaluator cache) do not collide.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:  # writers such as safetensors' save_file take a path, so fsync here
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
