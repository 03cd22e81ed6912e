"""Divergence guard: stop a run whose losses or weights are no longer finite, before it checkpoints them.

Two checks, neither adds a host sync per step:
- the metric window (means over processes and steps) is already brought to the host at every log step;
  a NaN or inf anywhere in the window makes its mean non-finite, so `check_metrics` sees it there;
- `check_weights` runs before every checkpoint (a collective: every rank tests its own tensors, the
  flags are summed across ranks), so a checkpoint with non-finite weights is never written, and rotation
  never deletes the finite checkpoints that came before it.

Every rank sees the same reduced numbers and raises the same `DivergenceError` at the same step; the command
line turns it into one `error:` line and exit code 3 (`faults.EXIT_DIVERGED`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from gan_ddp.errors import GanDdpError

# Metric keys that stop the run when non-finite (means over the window). Rates, times and scale are not
# training quantities: an fp16 scale of inf would be the scaler's business, and it never gets there.
WATCHED = ("loss/d", "loss/g", "score/real", "score/fake")


class DivergenceError(GanDdpError, RuntimeError):
    """Training produced non-finite losses or weights; the message names the step and the quantity."""

    exit_code = 3  # faults.EXIT_DIVERGED
    all_ranks = True  # every rank raises it together: the command line prints it from rank 0 only


def nonfinite_metric(metrics: dict[str, Any], keys: Iterable[str] = WATCHED) -> str | None:
    """The first watched key whose value is NaN or infinite, or None."""
    for key in keys:
        value = metrics.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            return key
    return None


def strict_json(metrics: dict[str, Any]) -> dict[str, Any]:
    """Non-finite floats as null: `json.dumps` would write bare NaN/Infinity tokens, which are not JSON and
    which strict parsers (jq, JavaScript, Go, pandas with engine="pyarrow") reject."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def nonfinite_tensors(models: dict[str, nn.Module]) -> tuple[list[str], torch.Tensor]:
    """(names, flags): one flag per parameter and floating-point buffer, 1.0 where it holds a NaN or inf."""
    names, flags = [], []
    for prefix, model in models.items():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point():
                names.append(f"{prefix}.{name}")
                flags.append(~torch.isfinite(t.detach()).all())
    if not flags:
        return names, torch.zeros(0)
    return names, torch.stack(flags).float()


def check_weights(accelerator, models: dict[str, nn.Module], step: int) -> None:
    """Collective (every rank must call it): raise DivergenceError, on every rank, if any rank holds a
    non-finite weight or buffer. One reduce of one flag per tensor."""
    names, flags = nonfinite_tensors(models)
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    bad = [name for name, f in zip(names, flags.tolist(), strict=True) if f]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DivergenceError(f"step {step}: non-finite weights in {bad[0]}{more}")


def check_metrics(metrics: dict[str, Any]) -> None:
    key = nonfinite_metric(metrics)
    if key is not None:
        raise DivergenceError(f"step {metrics['step']}: {key} is {metrics[key]} (mean since the previous log line)")
