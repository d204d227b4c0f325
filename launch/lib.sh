# Sourced by cpu.sh, gpu.sh and multinode.sh: `run [NAME=value ...] COMMAND ...` runs the launcher.
# DRY_RUN=1: print the command, shell-quoted and ready to paste (environment settings first),
# instead of running it. Otherwise the launcher runs in a session of its own as a child of this
# shell, killed if this shell dies (launch/guard.py; its ranks then checkpoint and stop), with
# its stderr passed through launch/quiet.py (no torchrun log lines or failure report, and a rank
# error line that every rank printed shown once). This shell:
#  - forwards SIGTERM, SIGHUP (as SIGTERM) and SIGINT (SLURM preemption, Ctrl-C) once, to the
#    ranks, which checkpoint at the end of their step and exit 75. (accelerate's own handling
#    would print a SignalException traceback and SIGKILL the ranks 30 s later, mid-save or not.)
#  - waits for the ranks, even when the launcher was killed under them;
#  - exits with the launcher's code, except 75 when every local rank exited 75 (checkpointed and
#    stopped: a signal, the time limit, or the launcher's death), where accelerate exits 1, and
#    2 when a local rank exited 2 (a user error, said in one `error:` line) and no other rank
#    recorded another code (the launcher may kill a slower rank before it records its own 2).
# LOCAL_PROCS: the number of ranks this machine runs.
run() {
  if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "$@" | sed 's/ $//'; echo; return 0; fi
  local rc=0
  _EXIT_DIR=$(mktemp -d)
  trap 'rm -rf "$_EXIT_DIR"' EXIT
  export TOKENCLOCK_EXIT_DIR="$_EXIT_DIR"
  # A session of its own: a terminal's Ctrl-C reaches only this shell, which forwards it once.
  # The subshell restores SIGINT, which bash ignores in background commands.
  local py=${PY:-python} here
  here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  mkfifo "$_EXIT_DIR/stderr"
  (trap '' INT TERM HUP; exec "$py" "$here/quiet.py") <"$_EXIT_DIR/stderr" >&2 &
  local filter=$!
  (trap - INT QUIT; exec "$py" "$here/guard.py" "$$" env "$@") 2>"$_EXIT_DIR/stderr" &
  _PID=$!
  trap '_forward TERM' TERM HUP
  trap '_forward INT' INT
  # Poll rather than `wait`, to know the ranks: if the launcher is killed they go on to
  # checkpoint and stop (train/stop.py), and this script must not end (nor SLURM's job) before.
  local ranks=""
  while kill -0 "$_PID" 2>/dev/null; do
    ranks=$(pgrep -P "$_PID" || true)
    sleep 1 & wait $! || true
  done
  wait "$_PID" || rc=$?
  while _alive $ranks; do sleep 1 & wait $! || true; done
  # Every line the ranks wrote is out before this script's last one (within 10 s: a process
  # the ranks left behind may hold their stderr open).
  local i
  for i in 1 2 3 4 5 6 7 8 9 10; do _alive "$filter" || break; sleep 1 & wait $! || true; done
  local stopped=0 refused=0 other=0 f
  for f in "$_EXIT_DIR"/rank_*; do
    [ -f "$f" ] || continue
    case "$(cat "$f")" in
      75) stopped=$((stopped + 1)) ;;
      2) refused=$((refused + 1)) ;;
      *) other=$((other + 1)) ;;
    esac
  done
  if [ "$rc" -ne 0 ] && [ "$stopped" -eq "${LOCAL_PROCS:-1}" ]; then
    echo "${0##*/}: every rank checkpointed and stopped (exit 75); resume with resume=auto" >&2
    exit 75
  fi
  # Every rank checks the same config, but the launcher stops the others as soon as one exits:
  # a slower rank may be killed before it records its 2. A user error is the run's error when
  # some rank refused and none recorded anything else (a killed rank records nothing).
  if [ "$rc" -ne 0 ] && [ "$refused" -ge 1 ] && [ "$stopped" -eq 0 ] && [ "$other" -eq 0 ]; then
    exit 2
  fi
  exit "$rc"
}

# Whether any of the processes given is still running.
_alive() {
  local p
  for p in "$@"; do kill -0 "$p" 2>/dev/null && return 0; done
  return 1
}

# Send signal $1 to the launcher's children (the ranks), or to the launcher before it has any.
_forward() {
  local ranks
  ranks=$(pgrep -P "$_PID" || true)
  # shellcheck disable=SC2086
  kill -s "$1" ${ranks:-$_PID} 2>/dev/null || true
}
