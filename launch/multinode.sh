#!/usr/bin/env bash
# Run on EVERY machine of a multi-node job (launch/slurm.sbatch does it through srun):
#   MASTER_ADDR=node0 NNODES=2 NODE_RANK=0 PROCS_PER_NODE=8 launch/multinode.sh CONFIG [key=value ...]
# MASTER_ADDR: the address of the machine with NODE_RANK=0, reachable from all; MASTER_PORT
# (default 29500): a free port there. CONFIG_FILE picks the accelerate config (default
# launch/accelerate/multinode.yaml, DDP; launch/accelerate/gpu_fsdp2.yaml with fsdp=true for
# FSDP2). DRY_RUN=1 prints the resolved command instead of running it.
set -euo pipefail
: "${MASTER_ADDR:?set MASTER_ADDR to the address of the machine with NODE_RANK=0}"
: "${NNODES:?set NNODES to the number of machines}"
: "${NODE_RANK:?set NODE_RANK to the rank of this machine, 0..NNODES-1}"
MASTER_PORT=${MASTER_PORT:-29500}
PROCS_PER_NODE=${PROCS_PER_NODE:-8}
PY=${PY:-python}
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONFIG_FILE=${CONFIG_FILE:-$HERE/accelerate/multinode.yaml}
if [ "$NODE_RANK" -lt 0 ] || [ "$NODE_RANK" -ge "$NNODES" ]; then
  echo "multinode.sh: NODE_RANK=$NODE_RANK is not in 0..$((NNODES - 1))" >&2; exit 2
fi
ACCELERATE="$(dirname "$PY")/accelerate"
[ -x "$ACCELERATE" ] || ACCELERATE=accelerate
WORLD=$((NNODES * PROCS_PER_NODE))
# run: DRY_RUN=1 prints the command; signals go to the ranks; exit 75 when they stopped (lib.sh).
# shellcheck source=launch/lib.sh
source "$HERE/lib.sh"
LOCAL_PROCS="$PROCS_PER_NODE"
run "$ACCELERATE" launch --config_file "$CONFIG_FILE" --num_machines "$NNODES" \
  --num_processes "$WORLD" --machine_rank "$NODE_RANK" --main_process_ip "$MASTER_ADDR" \
  --main_process_port "$MASTER_PORT" -m train "$@" world_size="$WORLD"
