"""Exploration schedules: objects t -> value, t = environment steps taken so far (warm-up included).

LinearSchedule:      eps(t) = start + (end - start) * min(t / duration, 1)
ExponentialSchedule: eps(t) = end + (start - end) * exp(-t / duration)   (duration = time constant)
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LinearSchedule:
    start: float
    end: float
    duration: int

    def __call__(self, t: int) -> float:
        frac = min(max(t, 0) / self.duration, 1.0) if self.duration > 0 else 1.0
        return self.start + (self.end - self.start) * frac


@dataclass(frozen=True)
class ExponentialSchedule:
    start: float
    end: float
    duration: int

    def __call__(self, t: int) -> float:
        if self.duration <= 0:
            return self.end
        return self.end + (self.start - self.end) * math.exp(-max(t, 0) / self.duration)


def make_schedule(kind: str, start: float, end: float, duration: int):
    return {"linear": LinearSchedule, "exponential": ExponentialSchedule}[kind](start, end, duration)
