"""The metric names a "no such metric" line lists: those a user compares first, first.

Sorted alphabetically, a run's names start with lr-* and system/* (a dozen of them), and a list cut
at 12 or 15 hid val/acc, test/acc and train/*. Here test/, val/, best/ and train/ come first, then
other names (epoch, ...), then lr-* and system/*; each group alphabetical. A short list is shown whole.
"""

from __future__ import annotations

FIRST = ("test/", "val/", "best/", "train/")
LAST = ("lr-", "system/")


def useful_first(names) -> list[str]:
    def rank(name: str) -> int:
        for i, prefix in enumerate(FIRST):
            if name.startswith(prefix):
                return i
        for i, prefix in enumerate(LAST):
            if name.startswith(prefix):
                return len(FIRST) + 1 + i
        return len(FIRST)

    return sorted(set(names), key=lambda n: (rank(n), n))


def logged_list(names, limit: int = 15) -> str:
    """'test/acc, val/acc, ...' with every name when there are at most `limit`, else the first
    `limit` and how many more."""
    ordered = useful_first(names)
    if len(ordered) <= limit:
        return ", ".join(ordered)
    return ", ".join(ordered[:limit]) + f", ... ({len(ordered) - limit} more)"
