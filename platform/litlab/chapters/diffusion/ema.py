"""Exponential moving average of a network's weights, the weights diffusion models sample with.

    shadow <- d * shadow + (1 - d) * param,   d = min(decay, (1 + n) / (10 + n)) with warmup, else decay

(n = number of updates so far; the warmup lets the average forget the random init quickly). Buffers
(e.g. BatchNorm statistics) are copied, not averaged. The EMA is not an nn.Module of the
LightningModule (so the optimiser never sees it); its `state_dict()` goes into the checkpoint through
the module's on_save_checkpoint / on_load_checkpoint, so a resumed run keeps averaging where it stopped.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    def __init__(self, net: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0 <= decay < 1:
            raise ValueError("decay must be in [0, 1)")
        self.decay, self.warmup = decay, warmup
        self.num_updates = 0
        self.shadow = {k: v.detach().clone() for k, v in net.state_dict().items()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        d = self.current_decay()
        for k, v in net.state_dict().items():
            s = self.shadow[k]
            if s.device != v.device:
                s = self.shadow[k] = s.to(v.device)
            if v.is_floating_point():
                s.mul_(d).add_(v.detach(), alpha=1 - d)  # d * shadow + (1 - d) * param
            else:
                s.copy_(v)
        self.num_updates += 1

    @contextmanager
    def applied_to(self, net: nn.Module):
        """Temporarily load the averaged weights into `net` (restored on exit)."""
        backup = {k: v.detach().clone() for k, v in net.state_dict().items()}
        net.load_state_dict(self.shadow)
        try:
            yield net
        finally:
            net.load_state_dict(backup)

    def copy_to(self, net: nn.Module) -> None:
        net.load_state_dict(self.shadow)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": {k: v.detach().cpu().clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.warmup, self.num_updates = state["decay"], state["warmup"], state["num_updates"]
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state does not match the network: {sorted(missing)[:5]}")
        device = {k: v.device for k, v in self.shadow.items()}
        self.shadow = {k: v.to(device[k]) for k, v in state["shadow"].items()}
