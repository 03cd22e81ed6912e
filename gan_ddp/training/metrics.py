"""The training metrics between two log steps, accumulated on the device and named.

Every step adds its losses and scores to a small float64 tensor on the device (no host synchronisation);
at a log step one collective reduce brings the window to the host. Each process adds its terms divided by the
world size, so the reduced sums are per-step global means: a window saved by N processes and resumed by M
still averages exactly the steps it holds. Checkpoints store the window by field name.
"""

from __future__ import annotations

from typing import Any

import torch

# What a step adds: D loss and scores every step, the G loss only on steps with a G update (counted in
# g_steps), and 1 to `steps`. Means divide by `steps` (`g_steps` for the G loss).
FIELDS = ("loss/d", "score/real", "score/fake", "loss/g", "g_steps", "steps")
_LEGACY_ORDER = FIELDS  # checkpoints before named windows stored the sums as a list in this order


class MetricWindow:
    def __init__(self, device: torch.device, world: int) -> None:
        self.world = world
        self.sums = torch.zeros(len(FIELDS), device=device, dtype=torch.float64)
        self.local_steps = 0  # steps this process ran in the window (the img/s numerator)

    def add(self, values: dict[str, torch.Tensor]) -> None:
        """One step's 0-dim device tensors, by field name (missing ones count 0). No host sync."""
        zero = torch.zeros((), device=self.sums.device, dtype=torch.float64)
        row = torch.stack([values[k].double() if k in values else zero for k in FIELDS])
        self.sums += row / self.world
        self.local_steps += 1

    def reduce(self, accelerator: Any) -> dict[str, float]:
        """Collective: the global sums, by name (one host sync)."""
        return dict(zip(FIELDS, accelerator.reduce(self.sums.clone(), reduction="sum").tolist(), strict=True))

    @staticmethod
    def means(totals: dict[str, float]) -> dict[str, float]:
        n, g_n = max(totals["steps"], 1.0), max(totals["g_steps"], 1.0)
        return {
            "loss/d": totals["loss/d"] / n,
            "score/real": totals["score/real"] / n,
            "score/fake": totals["score/fake"] / n,
            "loss/g": totals["loss/g"] / g_n,
        }

    def value(self, name: str) -> float:
        """This process's running sum of one field (host sync: tests and tools, not the loop)."""
        return float(self.sums[FIELDS.index(name)])

    def reset(self) -> None:
        self.sums.zero_()
        self.local_steps = 0

    def state(self, totals: dict[str, float]) -> dict[str, Any]:
        """The open window for a checkpoint: global sums by name (from `reduce`) and the local step count."""
        return {"sums": dict(totals), "steps": self.local_steps}

    def load(self, state: dict[str, Any], saved_world: int, holds_sums: bool) -> None:
        """Restore a checkpoint's window. The global sums go to one process only (`holds_sums`): the next
        reduce adds them in. Reads the named layout and the two list layouts of older checkpoints."""
        sums = state["sums"]
        if isinstance(sums, list):
            if len(sums) == 5:  # the oldest: plain sums over processes, without the step count
                sums = [x / saved_world for x in sums] + [state["steps"]]
            sums = dict(zip(_LEGACY_ORDER, sums, strict=True))
        self.sums.zero_()
        if holds_sums:
            self.sums.copy_(torch.tensor([float(sums[k]) for k in FIELDS], dtype=torch.float64))
        self.local_steps = int(state["steps"])
