#!/usr/bin/env bash
# Train on the GPUs of one machine: MODE=single (1 GPU), ddp (DDP over NCCL) or fsdp2 (FSDP2
# full shard, bf16, per-block activation checkpointing).
#   MODE=fsdp2 NPROC=8 launch/gpu.sh configs/train/demo.yaml [key=value ...]
# NPROC defaults to the number of GPUs nvidia-smi lists. DRY_RUN=1 prints the command.
set -euo pipefail
MODE=${MODE:-ddp}
PY=${PY:-python}
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ "$MODE" != single ] && [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "$NPROC" -gt 0 ] || { echo "gpu.sh: no GPU found by nvidia-smi; set NPROC" >&2; exit 2; }
fi
ACCELERATE="$(dirname "$PY")/accelerate"
[ -x "$ACCELERATE" ] || ACCELERATE=accelerate
PORT=${MASTER_PORT:-29500}
case "$MODE" in
  single) DIST=(--config_file "$HERE/accelerate/gpu_1.yaml" --quiet); NPROC=1; EXTRA=(mixed_precision=bf16) ;;
  ddp)    DIST=(--config_file "$HERE/accelerate/gpu_ddp.yaml" --num_processes "$NPROC" --main_process_port "$PORT")
          EXTRA=(mixed_precision=bf16) ;;
  fsdp2)  DIST=(--config_file "$HERE/accelerate/gpu_fsdp2.yaml" --num_processes "$NPROC" --main_process_port "$PORT")
          EXTRA=(mixed_precision=bf16 fsdp=true) ;;
  *) echo "gpu.sh: MODE=$MODE; valid: single, ddp, fsdp2" >&2; exit 2 ;;
esac
# run: DRY_RUN=1 prints the command; signals go to the ranks; exit 75 when they stopped (lib.sh).
# shellcheck source=launch/lib.sh
source "$HERE/lib.sh"
LOCAL_PROCS="$NPROC"
CONFIG=${1:?usage: MODE=ddp launch/gpu.sh CONFIG [key=value ...]}; shift
# The mode's settings come first, so that key=value arguments given here override them.
run "$ACCELERATE" launch "${DIST[@]}" -m train "$CONFIG" "${EXTRA[@]}" "$@" world_size="$NPROC"
