#!/usr/bin/env bash
# Train with NPROC processes on a CPU-only host (DDP over gloo; FSDP2 with fsdp=true).
#   NPROC=2 launch/cpu.sh configs/train/demo.yaml [key=value ...]
# `accelerate launch --cpu --num_processes N` starts only ONE process, and `--multi_gpu` alone
# on a CPU host starts N unconnected runs; ACCELERATE_USE_CPU=1 with a multi-device config gives
# one N-process gloo group. world_size=N makes training fail loudly if it got anything else.
# DRY_RUN=1 prints the command instead of running it. MODULE=train.ablate runs another module of
# this checkout on the same ranks (train.ablate's multi-process memory probe).
set -euo pipefail
NPROC=${NPROC:-2}
PY=${PY:-python}
PORT=${MASTER_PORT:-$((29500 + RANDOM % 1000))}
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ACCELERATE="$(dirname "$PY")/accelerate"
[ -x "$ACCELERATE" ] || ACCELERATE=accelerate
if [ "$NPROC" -gt 1 ]; then
  # quiet: torchrun's failure report without accelerate's traceback around it (lib.sh drops both)
  DIST=(--config_file "$HERE/accelerate/cpu_ddp.yaml" --num_processes "$NPROC" --main_process_port "$PORT" --quiet)
else
  DIST=(--config_file "$HERE/accelerate/cpu_1proc.yaml" --quiet)  # quiet: no traceback on exit 75
fi
# WANDB_MODE is left to train/trackers.py: online with wandb credentials, offline without.
# run: DRY_RUN=1 prints the command; signals go to the ranks; exit 75 when they stopped (lib.sh).
# shellcheck source=launch/lib.sh
source "$HERE/lib.sh"
LOCAL_PROCS="$NPROC"
run ACCELERATE_USE_CPU=1 "$ACCELERATE" launch "${DIST[@]}" -m "${MODULE:-train}" "$@" world_size="$NPROC"
