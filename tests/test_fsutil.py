"""`fsutil.atomic_write`: readers see the old file or the new one, never a partial one, and no temporary is left."""

from __future__ import annotations

from pathlib import Path

import pytest

from gan_ddp.runtime.fsutil import atomic_write


def test_writes_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "card.json"  # missing folders are created
    atomic_write(path, lambda tmp: tmp.write_text("new"))
    assert path.read_text() == "new"
    assert [p.name for p in path.parent.iterdir()] == ["card.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("old\n")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
