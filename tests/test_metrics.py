"""The metrics window: named fields on the device, per-step global means, checkpoint layouts old and new."""

from __future__ import annotations

import pytest
import torch

from gan_ddp.training.metrics import FIELDS, MetricWindow


class SumAccelerator:
    """`reduce(sum)` over stand-in processes: each holds its own window."""

    def __init__(self, windows: list[MetricWindow]) -> None:
        self.windows = windows

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "sum"
        return sum(w.sums for w in self.windows)


def _step(window: MetricWindow, d: float, g: float | None) -> None:
    t = lambda x: torch.tensor(x)  # noqa: E731
    values = {"loss/d": t(d), "score/real": t(0.75), "score/fake": t(0.25), "steps": t(1.0)}
    if g is not None:
        values |= {"loss/g": t(g), "g_steps": t(1.0)}
    window.add(values)


def test_means_over_steps_and_processes() -> None:
    a, b = MetricWindow(torch.device("cpu"), 2), MetricWindow(torch.device("cpu"), 2)
    for d_a, d_b, g in ((1.0, 3.0, 4.0), (2.0, 2.0, None), (0.0, 4.0, 6.0)):
        _step(a, d_a, g)
        _step(b, d_b, g and g + 2)
    totals = a.reduce(SumAccelerator([a, b]))
    assert set(totals) == set(FIELDS)
    assert totals["steps"] == pytest.approx(3.0) and totals["g_steps"] == pytest.approx(2.0)
    means = MetricWindow.means(totals)
    assert means["loss/d"] == pytest.approx(2.0)  # (1+3+2+2+0+4) / 6
    assert means["loss/g"] == pytest.approx(6.0)  # (4+6+6+8) / 4: only steps with a G update
    assert (means["score/real"], means["score/fake"]) == pytest.approx((0.75, 0.25))
    assert a.local_steps == 3
    a.reset()
    assert a.local_steps == 0 and not a.sums.any()


def test_checkpoint_state_is_by_name_and_old_layouts_load() -> None:
    window = MetricWindow(torch.device("cpu"), 1)
    _step(window, 2.0, 3.0)
    state = window.state(window.reduce(SumAccelerator([window])))
    assert state == {"sums": dict(zip(FIELDS, [2.0, 0.75, 0.25, 3.0, 1.0, 1.0], strict=True)), "steps": 1}

    for saved, world in (
        (state, 1),
        ({"sums": [2.0, 0.75, 0.25, 3.0, 1.0, 1.0], "steps": 1}, 1),
        ({"sums": [4.0, 1.5, 0.5, 6.0, 2.0], "steps": 1}, 2),
    ):  # 5 slots: sums over 2 processes
        main, other = MetricWindow(torch.device("cpu"), 1), MetricWindow(torch.device("cpu"), 1)
        main.load(saved, saved_world=world, holds_sums=True)
        other.load(saved, saved_world=world, holds_sums=False)
        assert main.sums.tolist() == pytest.approx([2.0, 0.75, 0.25, 3.0, 1.0, 1.0])
        assert not other.sums.any() and other.local_steps == main.local_steps == 1
