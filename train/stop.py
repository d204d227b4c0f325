"""When to checkpoint and stop early: on SIGTERM / SIGINT, or before the time limit.

SLURM preempts a job with SIGTERM, and a job that outlives its time limit is killed without
a save. So the loop asks `Stopper.check` after every step, and on a stop it checkpoints and
exits with `EXIT_STOPPED` (75, EX_TEMPFAIL: "try again"), to be resumed with `resume=auto`.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable

log = logging.getLogger("train")
EXIT_STOPPED = 75  # checkpointed and stopped on SIGTERM/SIGINT or time limit (EX_TEMPFAIL)


class StopRequest:
    """Turns SIGTERM / SIGINT (SLURM preemption, Ctrl-C) into a flag read at step boundaries.

    A second SIGINT interrupts at once, for a user who does not want to wait for the save.
    """

    def __init__(self):
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        log.warning(f"received {signal.Signals(signum).name}: checkpointing at the end of this step")


class Stopper:
    """Decides once per step whether the run stops here. Created when the loop starts: the
    time limit counts from then, and the signal handlers are installed then."""

    def __init__(self, time_limit_s: float, any_rank: Callable[[bool], bool]):
        self.time_limit_s = time_limit_s
        self.any_rank = any_rank  # an all-rank vote: True on every rank if True on any
        self.request = StopRequest()
        self.started = time.monotonic()

    def check(self, step_s: float, save_s: float) -> str | None:
        """Why to stop after this step ("signal" or "time limit"), or None to go on.

        Late means the limit would pass before one more step (counted twice: steps vary) and
        a save as long as the last one could finish. A signal may reach only some ranks, and
        their clocks differ, so they vote: all ranks must stop at the same step, or the
        collectives of the save and the next step would hang.
        """
        elapsed = time.monotonic() - self.started
        late = bool(self.time_limit_s) and elapsed + 2 * step_s + save_s >= self.time_limit_s
        if not self.any_rank(self.request.signal is not None or late):
            return None
        return "time limit" if late else "signal"
