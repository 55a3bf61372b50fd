"""Numbers as a person reads them: sizes in GiB, parameter counts, durations."""
from __future__ import annotations

GIB = 2**30


def gib(size_bytes: float | None) -> str:
    return "—" if size_bytes is None else f"{size_bytes / GIB:.2f} GiB"


def size(size_bytes: float) -> str:
    """GiB from 1 GiB up, MiB below (a 40 MiB term shows as 40 MiB, not 0.04 GiB)."""
    if abs(size_bytes) >= GIB:
        return f"{size_bytes / GIB:.2f} GiB"
    return f"{size_bytes / 2**20:.0f} MiB" if abs(size_bytes) >= 2**20 else f"{size_bytes / 1024:.0f} KiB"


def count(value: float | None) -> str:
    if value is None:
        return "—"
    for limit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.1f}{suffix}"
    return f"{value:g}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def number(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}g}"
