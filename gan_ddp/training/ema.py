"""Exponential moving average of the generator's weights (sampling and evaluation use it by default)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class GeneratorEMA:
    """Keeps `shadow`, a frozen copy of G whose parameters follow G with decay `beta`.

    The ramp-up `beta_t = min(decay, (1 + t) / (10 + t))` lets the average forget the random
    initialisation quickly during the first few hundred updates instead of carrying it for 1/(1-decay)
    steps. Buffers (BatchNorm statistics) are copied, not averaged.
    """

    def __init__(self, generator: nn.Module, decay: float, rampup: bool = True) -> None:
        self.decay = decay
        self.rampup = rampup
        self.updates = 0
        self.shadow = copy.deepcopy(generator).eval().requires_grad_(False)

    def beta(self) -> float:
        if not self.rampup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, generator: nn.Module) -> None:
        beta = self.beta()
        ema_p = [p for p in self.shadow.parameters()]
        new_p = [p.detach() for p in generator.parameters()]
        torch._foreach_lerp_(ema_p, new_p, 1.0 - beta)  # ema += (1 - beta) * (new - ema), fused
        for b_ema, b in zip(self.shadow.buffers(), generator.buffers(), strict=True):
            b_ema.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"shadow.{k}": v for k, v in self.shadow.state_dict().items()}
        state["updates"] = torch.tensor(self.updates, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.updates = int(state["updates"])
        self.shadow.load_state_dict({k[len("shadow.") :]: v for k, v in state.items() if k.startswith("shadow.")})
