"""When to checkpoint and stop early: on SIGTERM / SIGINT, when the launcher dies, or before
the time limit.

SLURM preempts a job with SIGTERM, and a job that outlives its time limit is killed without
a save. So the loop asks `Stopper.check` after every step, and on a stop it checkpoints and
exits with `EXIT_STOPPED` (75, EX_TEMPFAIL: "try again"), to be resumed with `resume=auto`.
A rank whose launcher (accelerate, torchrun) was killed would otherwise train on to the end
with nobody waiting for it; it takes that as the same stop request.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

log = logging.getLogger("train")
EXIT_STOPPED = 75  # checkpointed and stopped on SIGTERM/SIGINT or time limit (EX_TEMPFAIL)


WATCH_INTERVAL_S = 0.5  # how often the parent-death watchdog looks


def launcher_pid() -> int | None:
    """The pid of the launcher that started this process (accelerate launch, torchrun), or None
    when it was started otherwise (`python -m train` from a shell, which may exit and leave it
    running on purpose, as under nohup)."""
    from train.distributed import PARENT_PID, launcher_command

    if launcher_command(PARENT_PID) is None and "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    return PARENT_PID


class StopRequest:
    """Turns SIGTERM / SIGINT (SLURM preemption, Ctrl-C), and the death of the launcher that
    started this rank, into a flag read at step boundaries.

    A second SIGINT interrupts at once, for a user who does not want to wait for the save.
    The launcher is watched by a thread polling os.getppid(): when the parent dies the rank is
    re-parented, and its parent pid changes. (PR_SET_PDEATHSIG would fire when the launcher's
    spawning *thread* ends, and kills rather than asks.)
    """

    def __init__(self, parent: int | None | str = "launcher"):
        self.signal: int | None = None
        self.reason: str | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        self.parent = launcher_pid() if parent == "launcher" else parent
        if self.parent is not None:
            threading.Thread(target=self._watch_parent, name="parent-watchdog", daemon=True).start()

    def _handle(self, signum, frame):
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal, self.reason = signum, "signal"
        log.warning(f"received {signal.Signals(signum).name}: checkpointing at the end of this step")

    def _watch_parent(self):
        while os.getppid() == self.parent:
            time.sleep(WATCH_INTERVAL_S)
        if self.signal is None:
            self.signal, self.reason = signal.SIGTERM, "launcher died"
            log.warning(f"the launcher (pid {self.parent}) died: checkpointing at the end of "
                        "this step")


class Stopper:
    """Decides once per step whether the run stops here. Created when the loop starts: the
    time limit counts from then, and the signal handlers are installed then."""

    def __init__(self, time_limit_s: float, any_rank: Callable[[bool], bool]):
        self.time_limit_s = time_limit_s
        self.any_rank = any_rank  # an all-rank vote: True on every rank if True on any
        self.request = StopRequest()
        self.started = time.monotonic()

    def check(self, step_s: float, save_s: float) -> str | None:
        """Why to stop after this step ("signal", "launcher died" or "time limit"), or None.

        Late means the limit would pass before one more step (counted twice: steps vary) and
        a save as long as the last one could finish. A signal may reach only some ranks, and
        their clocks differ, so they vote: all ranks must stop at the same step, or the
        collectives of the save and the next step would hang.
        """
        elapsed = time.monotonic() - self.started
        late = bool(self.time_limit_s) and elapsed + 2 * step_s + save_s >= self.time_limit_s
        if not self.any_rank(self.request.signal is not None or late):
            return None
        return "time limit" if late else self.request.reason or "signal"
