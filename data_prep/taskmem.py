"""The peak memory of one task, measured inside the task (issue 23: which task's memory grows
with the corpus). A worker process runs many tasks one after the other, so its lifetime peak
(`ru_maxrss`) says nothing about the current one: on Linux a task resets the process's peak
resident set (`VmHWM`, by writing 5 to /proc/self/clear_refs, Linux >= 4.0) when it starts and
reads it when it ends. Where that is not possible the figure is the process's lifetime peak
(`ru_maxrss`), an upper bound. The figure is resident memory, so it counts the object-store pages
a Ray task maps as well as its own, and what the process already held when the task started
(a worker keeps its heap between tasks); so each task also records its rise, peak - RSS at its
start, which is what the task itself added.
"""

from __future__ import annotations

import re
import resource
import sys

_HWM = re.compile(rb"VmHWM:\s+(\d+) kB")
_RSS = re.compile(rb"VmRSS:\s+(\d+) kB")


def _status(field: re.Pattern) -> int | None:
    try:
        with open("/proc/self/status", "rb") as f:
            m = field.search(f.read())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


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
    peak = _status(_HWM)
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes, Linux: KiB


def start() -> int:
    """A task starts: the peak reset (`reset_peak`); returns the RSS it starts from (0 where
    it cannot be read)."""
    reset_peak()
    return _status(_RSS) or 0


def measure(started: int) -> tuple[int, int]:
    """A task ends: (its peak RSS, the rise of that peak over the RSS `start` returned)."""
    peak = peak_rss()
    return peak, max(0, peak - started)


def merge_peaks(into: dict[str, list[int]], name: str, m: tuple[int, int] | list[int]) -> None:
    """`into[name]` = the larger peak and the larger rise of it and `m` (a stage's maxima per
    kind of task)."""
    old = into.get(name, [0, 0])
    into[name] = [max(old[0], int(m[0])), max(old[1], int(m[1]))]


def task_name(fn: object) -> str:
    """The name a task's peak is recorded under: its function's (`_steps_shard`, ...)."""
    return getattr(fn, "__name__", type(fn).__name__).lstrip("_")
