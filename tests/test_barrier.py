"""`barrier.main_first`: an error inside Accelerate's `main_process_first` reaches the caller only after the
block's closing barrier, so the other processes are never left waiting at theirs."""

from __future__ import annotations

import contextlib

import pytest

from gan_ddp.runtime.barrier import main_first


def _recording_block(events: list[str]):
    @contextlib.contextmanager
    def main_process_first():
        events.append("enter")
        yield
        events.append("closing barrier")  # skipped when an exception leaves the block unhandled

    return main_process_first


def test_an_error_is_raised_after_the_closing_barrier() -> None:
    events: list[str] = []
    failure = FileNotFoundError("data/t10k-images-idx3-ubyte")
    with pytest.raises(FileNotFoundError) as caught, main_first(_recording_block(events)):
        events.append("work")
        raise failure
    assert caught.value is failure  # the same exception, not a wrapper
    assert events == ["enter", "work", "closing barrier"]


def test_without_an_error_the_block_runs_once_between_the_barriers() -> None:
    events: list[str] = []
    with main_first(_recording_block(events)):
        events.append("work")
    assert events == ["enter", "work", "closing barrier"]
