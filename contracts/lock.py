"""One run per directory: `RUN/run.lock`, held by the training run that writes RUN.

The holder keeps an exclusive `flock` on the file for its whole life, and writes its pid, host
and start time into it for the refusal message. The kernel drops the lock when the process ends,
however it ends (SIGKILL included), so a lock left by a dead run never blocks a resume: the
next run simply takes it. The file itself is left in place.

Where the filesystem has no `flock` (some network filesystems mounted without lock support),
the file's contents decide instead: a holder on this host whose pid is gone is stale and taken
over; a holder on another host is trusted to be alive, and the refusal says to delete the file
if it is not (docs/faults.md, "What is handled").
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from pathlib import Path

LOCK = "run.lock"
_held: dict[Path, int] = {}  # lock files this process holds, and their descriptors


class LockHeld(ValueError):
    """Another live run holds the directory (a user error: one line)."""


def _holder_text(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return (f"pid {holder['pid']} on host {holder['host']}, since {holder['started']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


def acquire(run_dir: str | Path) -> Path:
    """Take RUN/run.lock for this process (creating RUN), or raise LockHeld naming the holder.
    Taking a lock this process already holds is a no-op. Returns the lock file's path."""
    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    path = (root / LOCK).resolve()
    if path in _held:
        return path
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LockHeld(f"{root} is in use by another run ({_holder_text(path)}; lock file "
                       f"{path}): wait for it to end, or choose another out_dir") from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            os.close(fd)
            raise
        _check_by_contents(path, root, me)  # no flock here: the pid and host decide
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    _held[path] = fd
    return path


def _check_by_contents(path: Path, root: Path, me: dict) -> None:
    """Without flock: refuse if the recorded holder may be alive (another host, or a live pid
    on this one)."""
    try:
        holder = json.loads(path.read_text())
        pid, host = int(holder["pid"]), str(holder["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # empty or unreadable: nobody finished taking it
    if host == me["host"]:
        if pid == me["pid"] or not _alive(pid):
            return  # ours, or a dead run's: stale
        raise LockHeld(f"{root} is in use by another run ({_holder_text(path)}; lock file "
                       f"{path}): wait for it to end, or choose another out_dir")
    raise LockHeld(f"{root} is in use by a run on another host ({_holder_text(path)}; lock "
                   f"file {path}, on a filesystem without flock): if that run is dead, delete "
                   "the lock file")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release(run_dir: str | Path) -> None:
    """Give the lock back at the end of a run (the end of the process does it too), leaving
    the file empty: free, also where there is no flock."""
    path = (Path(run_dir) / LOCK).resolve()
    fd = _held.pop(path, None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)
