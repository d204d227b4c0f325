"""`COMMAND 2> >(python launch/quiet.py)`: pass the launcher's stderr through, without
torchrun's own noise, so that what the user sees of a failed or stopped multi-process run is
what the ranks said.

Dropped: the elastic agent's log lines ("W1207 12:00:00.000 123 .../torch/distributed/...
Sending process 8259 closing signal SIGTERM") and its failure report (a block between two rules
of "=" whose first line ends in "FAILED", printed by `accelerate launch --quiet`), and an
`error: ...` line that another rank already printed (a config error is found by every rank).
Everything else passes unchanged, line by line. It ignores SIGINT/SIGTERM (the launch script
forwards those to the ranks, which still write here while they save).
"""

import re
import signal
import sys

NOISE = re.compile(rb"^[DIWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S*torch/distributed/")
RULE = re.compile(rb"^=+\s*$")

for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
out = sys.stderr.buffer
seen: set[bytes] = set()
held: list[bytes] = []  # blank lines and a rule that may open the report
in_report = False
for line in sys.stdin.buffer:
    text = line.rstrip(b"\r\n")
    if in_report:
        in_report = not RULE.match(text)
        continue
    if held and RULE.match(held[-1]) and text.endswith(b" FAILED"):
        held, in_report = [], True  # the report, and the blank lines before it
        continue
    if not text.strip() or RULE.match(text):
        held.append(line)
        continue
    out.writelines(held)
    held = []
    if NOISE.match(text) or text in seen:
        continue
    if text.startswith(b"error: "):
        seen.add(text)
    out.write(line)
    out.flush()
out.writelines(held)
out.flush()
