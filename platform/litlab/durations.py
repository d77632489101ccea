"""One way to write a duration, for every line litlab prints (progress ETA, sweep tables, runs)."""

from __future__ import annotations

import math


def fmt_duration(seconds: float | None) -> str:
    """4.2s under a minute, 1m05s under an hour, 2h03m07s above; "-" when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = max(seconds, 0.0)
    if seconds < 59.95:  # what would print as 60.0s is 1m00s
        return f"{seconds:.1f}s"
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m{s:02d}s"
