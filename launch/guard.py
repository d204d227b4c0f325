"""`python launch/guard.py PARENT_PID COMMAND...`: run COMMAND in a session of its own, killed
(SIGKILL) when the launch script PARENT_PID dies, however it dies.

lib.sh starts the launcher (accelerate, torchrun) through this. A session of its own keeps a
terminal's Ctrl-C from reaching it (the script forwards signals once, to the ranks); the
parent-death signal (Linux prctl PR_SET_PDEATHSIG, kept across exec) ends it when the script is
SIGKILLed, and its ranks then checkpoint and stop (train/stop.py) instead of training on,
orphaned. Elsewhere than Linux only the session is made.
"""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1

parent = int(sys.argv[1])
os.setsid()
try:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
except (AttributeError, OSError):  # not Linux
    pass
if os.getppid() != parent:  # the script died before the signal was armed
    sys.exit(1)
os.execvp(sys.argv[2], sys.argv[2:])
