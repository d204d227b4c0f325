#!/usr/bin/env bash
# Train with NPROC processes on a CPU-only host (DDP over gloo).
#   NPROC=2 launch/cpu.sh configs/train/demo.yaml [key=value ...]
# `accelerate launch --cpu --num_processes N` starts only ONE process, and `--multi_gpu` alone
# on a CPU host starts N unconnected runs; ACCELERATE_USE_CPU=1 with --multi_gpu gives one
# N-process gloo group. world_size=N makes training fail loudly if it got anything else.
set -euo pipefail
NPROC=${NPROC:-2}
PY=${PY:-python}
PORT=${MASTER_PORT:-$((29500 + RANDOM % 1000))}
ACCELERATE="$(dirname "$PY")/accelerate"
[ -x "$ACCELERATE" ] || ACCELERATE=accelerate
if [ "$NPROC" -gt 1 ]; then
  DIST=(--multi_gpu --num_processes "$NPROC" --main_process_port "$PORT")
else
  DIST=(--num_processes 1)
fi
export ACCELERATE_USE_CPU=1 WANDB_MODE=${WANDB_MODE:-offline}
# exec: the launcher replaces this shell, so SIGTERM/SIGINT reach it (and the ranks) directly.
if [ -n "${DRY_RUN:-}" ]; then RUN=echo; else RUN=exec; fi
$RUN "$ACCELERATE" launch "${DIST[@]}" --num_machines 1 --mixed_precision no --dynamo_backend no \
  -m train "$@" world_size="$NPROC"
