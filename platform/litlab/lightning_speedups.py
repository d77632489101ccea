"""Lightning internals made to return what they return, faster (installed by litlab.fast_loop)."""

from __future__ import annotations

import torch


def skip_needless_moves() -> None:
    """Every `self.log` call runs `_ResultMetric.to(value.device)`, which rebuilds the result's
    attribute dict through apply_to_collection (deep-copying its metadata dataclass): ~0.3 ms on a
    laptop CPU even when every tensor is on that device already. Return at once in that case (a
    move of tensors that are where they should be does nothing); any other case is Lightning's."""
    from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultMetric

    original = _ResultMetric.to
    if getattr(original, "_litlab", False):
        return

    def to(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and isinstance(args[0], torch.device) and _all_on(self.__dict__, args[0]):
            return self
        return original(self, *args, **kwargs)

    to._litlab = True
    _ResultMetric.to = to


def _all_on(attributes: dict, device: torch.device) -> bool:
    """Every tensor among the values (and the values of dict values) is on `device`; False if a
    value could hold tensors deeper down (a Metric, a list, ...)."""
    for value in attributes.values():
        if isinstance(value, torch.Tensor):
            if value.device != device:
                return False
        elif isinstance(value, dict):
            for inner in value.values():
                if isinstance(inner, torch.Tensor):
                    if inner.device != device:
                        return False
                elif isinstance(inner, (torch.nn.Module, list, tuple, dict)):
                    return False
        elif isinstance(value, (torch.nn.Module, list, tuple)):
            return False
    return True
