"""The peak memory of one task, measured inside the task (issue 23: which task's memory grows
with the corpus). A worker process runs many tasks one after the other, so its lifetime peak
(`ru_maxrss`) says nothing about the current one: on Linux a task resets the process's peak
resident set (`VmHWM`, by writing 5 to /proc/self/clear_refs, Linux >= 4.0) when it starts and
reads it when it ends. Where that is not possible the figure is the process's lifetime peak
(`ru_maxrss`), an upper bound. The figure is resident memory, so it counts the object-store pages
a Ray task maps as well as its own.
"""

from __future__ import annotations

import re
import resource
import sys

_HWM = re.compile(rb"VmHWM:\s+(\d+) kB")


def reset_peak() -> bool:
    """Start a task's measurement: the process's peak RSS set back to its current RSS.
    False where the kernel does not allow it (then `peak_rss` is the lifetime peak)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """The process's peak resident set in bytes since the last `reset_peak` (VmHWM), else its
    lifetime peak."""
    try:
        with open("/proc/self/status", "rb") as f:
            m = _HWM.search(f.read())
        if m:
            return int(m.group(1)) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes, Linux: KiB


def merge_peaks(into: dict[str, int], name: str, peak: int) -> None:
    """`into[name]` = the larger of it and `peak` (a stage's per-task maxima)."""
    if peak > into.get(name, 0):
        into[name] = peak


def task_name(fn: object) -> str:
    """The name a task's peak is recorded under: its function's (`_steps_shard`, ...)."""
    return getattr(fn, "__name__", type(fn).__name__).lstrip("_")
