"""Running a block on the main process first without letting an error strand the other processes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager


@contextlib.contextmanager
def main_first(main_process_first: Callable[[], AbstractContextManager[object]]) -> Iterator[None]:
    """`with main_first(accelerator.main_process_first):` runs the block on the main process, then on the others.

    Accelerate's `main_process_first` puts a barrier on each side of the block. An exception leaving the block
    would skip the process's closing barrier and leave the others waiting at theirs until the collective
    timeout, so the error is held until the block's barrier has been passed and raised after it. Pass
    `contextlib.nullcontext` for a single process.
    """
    failure: Exception | None = None
    with main_process_first():
        try:
            yield
        except Exception as exc:
            failure = exc
    if failure is not None:
        raise failure
