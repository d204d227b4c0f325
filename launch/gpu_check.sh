#!/usr/bin/env bash
# The one-call GPU check (issue 13): at most 6 minutes on one GPU, stages in priority order, each
# under `timeout`, every result in at most 8 files under OUT (default ./gpu_check_out):
#   summary.md      the closing report: stage table, ceiling, bench tables, real loops vs the
#                   bare step, generation and export, the README's GPU table row filled in
#   stages.tsv      stage, status, seconds, timeout, note (one line per stage)
#   gpu_check.log   every stage's command and output
#   env.txt         nvidia-smi, python, torch, CUDA, GPU, package versions
#   ceiling.json    the bf16 matmul ceiling (8192^3, median of repeats)
#   bench-eager.json, bench-compiled.json   python -m train.bench, gpt2-124m dims, 16 x 1024
#   loops.jsonl     the real loop's summaries: eager, compiled, full recompute, fp8, CUDA graphs,
#                   compiled optimizer
# Stages: env, ceiling, bench eager, bench compiled, loop eager, loop compiled, loop recompute,
# loop fp8 (mixed_precision=fp8; skipped with one line when it is refused), generation on the
# compiled run, export, then two compile options: loop cudagraphs (compile_mode=reduce-overhead)
# and loop compiled-optim (compile_optimizer=true). A stage that would start past the budget
# (BUDGET_S, default 320 s of stages; the closing report has 25 s more) is skipped, so the whole
# call stays under 6 minutes: the last ones run when the earlier ones leave time, or when
# BUDGET_S is raised (the stages' timeouts add up to 990 s).
#
#   launch/gpu_check.sh                      # on the GPU machine, from the repository root
#   WHEELS=wheels/ DATA=data/demo launch/gpu_check.sh   # no omegaconf there: carry its wheels
#   DRY_RUN=1 launch/gpu_check.sh            # print each stage's command, timeout, the files
#   DEVICE=cpu launch/gpu_check.sh           # CPU smoke: env, ceiling and bench, tiny preset
#
# Variables: OUT, DATA (a prepared dataset, default data/demo), PY (default: python3 on PATH),
# WHEELS (a folder of wheels: pip install --no-index --no-deps --target /tmp/site, then
# PYTHONPATH), DEVICE (cuda | cpu), BUDGET_S, LOOP_STEPS (default 30), WORK (scratch: runs).
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
cd "$ROOT" || exit 2
OUT=${OUT:-./gpu_check_out}
PY=${PY:-$(command -v python3 || echo python3)}
DATA=${DATA:-data/demo}
DEVICE=${DEVICE:-cuda}
BUDGET_S=${BUDGET_S:-320}
MIN_STAGE_S=${MIN_STAGE_S:-15}
LOOP_STEPS=${LOOP_STEPS:-30}
WORK=${WORK:-${TMPDIR:-/tmp}/tokenclock_gpu_check}  # runs and exports: not results
FILES=(summary.md stages.tsv gpu_check.log env.txt ceiling.json bench-eager.json
       bench-compiled.json loops.jsonl)
export WANDB_MODE=disabled PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DEVICE" = cpu ]; then  # the smoke mode: small and quick
  CEILING=(--ceiling-n 512 --ceiling-seconds 1 --precision fp32 --device cpu)
  BENCH=(--preset tiny --batch 2 --steps 2 --warmup 1 --repeats 2 --precision fp32 --device cpu)
else
  CEILING=(--ceiling-n 8192 --ceiling-seconds 3 --precision bf16 --device "$DEVICE")
  BENCH=(--preset gpt2-124m --batch 16 --seq-len 1024 --steps 10 --warmup 3 --repeats 3
         --precision bf16 --device "$DEVICE")
fi
LOOP=(env MODE=single PY="$PY" "$HERE/gpu.sh" configs/train/demo.yaml model.preset=gpt2-124m
      model.vocab_size=50304 batch_size=16 micro_batch_size=16 seq_len=1024 "data_dir=$DATA"
      "steps=$LOOP_STEPS" warmup_steps_excluded=5 "eval_every=$LOOP_STEPS" eval_batches=2
      log_every=10 tracker=none checkpoint_every=0 sample_tokens=32 peak_samples=1)

LOOP_AND_AFTER="loop-eager loop-compiled loop-recompute loop-fp8 generate export loop-cudagraphs
  loop-compiled-optim"

START=$SECONDS
# record NAME STATUS SECONDS TIMEOUT NOTE: one line of stages.tsv
record() {
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5//$'\t'/ }" >> "$OUT/stages.tsv"
  echo "gpu_check: $1: $2${5:+ ($5)} [${3}s]" >&2
}

# stage NAME TIMEOUT COMMAND...: run it under `timeout` within what is left of the budget.
stage() {
  local name=$1 limit=$2 rc=0 t0 left note
  shift 2
  if [ -n "${DRY_RUN:-}" ]; then
    printf 'stage %s (timeout %s s): ' "$name" "$limit"; printf '%q ' "$@" | sed 's/ $//'; echo
    return 0
  fi
  left=$((BUDGET_S - (SECONDS - START)))
  if [ "$left" -lt "$MIN_STAGE_S" ]; then
    record "$name" skipped 0 "$limit" "out of the ${BUDGET_S} s budget"; return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  { echo; echo "=== stage $name (timeout $limit s): $*"; } >> "$OUT/gpu_check.log"
  t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$WORK/$name.out" 2>&1 || rc=$?
  cat "$WORK/$name.out" >> "$OUT/gpu_check.log"
  note=$(grep -E '^(error|Error|[A-Za-z]*Error)[: ]' "$WORK/$name.out" | tail -n 1 | cut -c1-200)
  if [ "$rc" -eq 0 ]; then record "$name" ok $((SECONDS - t0)) "$limit" ""
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    record "$name" timeout $((SECONDS - t0)) "$limit" "stopped after $limit s"
  elif [ "$name" = loop-fp8 ] && { [ "$rc" -eq 2 ] || grep -qiE 'fp8|float8|torchao' <<< "$note"; }; then
    record "$name" skipped $((SECONDS - t0)) "$limit" "mixed_precision=fp8 refused or not available: ${note:-exit $rc}"
  else record "$name" "failed (exit $rc)" $((SECONDS - t0)) "$limit" "${note:-see gpu_check.log}"
  fi
  return 0
}

# skip NAME TIMEOUT REASON
skip() {
  if [ -n "${DRY_RUN:-}" ]; then echo "stage $1 (timeout $2 s): skipped: $3"; return 0; fi
  record "$1" skipped 0 "$2" "$3"
}

if [ -z "${DRY_RUN:-}" ]; then
  mkdir -p "$OUT" "$WORK"
  rm -f "${FILES[@]/#/$OUT/}" "$WORK"/*.out
  rm -rf "$WORK/runs" "$WORK/export" "$WORK/bench-eager" "$WORK/bench-compiled"
  : > "$OUT/gpu_check.log"
fi

if [ -n "${WHEELS:-}" ]; then  # the GPU image has no omegaconf: install carried wheels
  stage wheels 60 "$PY" -m pip install --no-index --no-deps --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
stage env 30 bash -c '{ nvidia-smi || echo "nvidia-smi: not available"; "$0" -m train.bench --env; } 2>&1' "$PY"
[ -z "${DRY_RUN:-}" ] && cp "$WORK/env.out" "$OUT/env.txt"
stage ceiling 45 "$PY" -m train.bench --ceiling-only "${CEILING[@]}" --out "$OUT"
stage bench-eager 75 "$PY" -m train.bench "${BENCH[@]}" --out "$WORK/bench-eager"
if [ "$DEVICE" = cpu ]; then
  reason="DEVICE=cpu: the smoke mode runs env, ceiling and the eager bench only"
  skip bench-compiled 150 "$reason (torch.compile on a CPU takes minutes)"
  for s in $LOOP_AND_AFTER; do skip "$s" 60 "$reason"; done
else
  stage bench-compiled 150 "$PY" -m train.bench "${BENCH[@]}" --compile --out "$WORK/bench-compiled"
  if [ -n "${DRY_RUN:-}" ] || [ -f "$DATA/meta.json" ]; then
    stage loop-eager 60 "${LOOP[@]}" compile=false "out_dir=$WORK/runs/eager"
    stage loop-compiled 120 "${LOOP[@]}" compile=true "out_dir=$WORK/runs/compiled"
    stage loop-recompute 60 "${LOOP[@]}" compile=false activation_checkpointing=full \
      "out_dir=$WORK/runs/recompute"
    stage loop-fp8 120 "${LOOP[@]}" compile=true mixed_precision=fp8 "out_dir=$WORK/runs/fp8"
    stage generate 45 "$PY" -m train.generate "$WORK/runs/compiled" --prompt "def " \
      --max-new-tokens 64 --device "$DEVICE"
    stage export 45 "$PY" -m train.export "$WORK/runs/compiled" "$WORK/export"
    stage loop-cudagraphs 120 "${LOOP[@]}" compile=true compile_mode=reduce-overhead \
      "out_dir=$WORK/runs/cudagraphs"
    stage loop-compiled-optim 120 "${LOOP[@]}" compile=true compile_optimizer=true \
      "out_dir=$WORK/runs/compiled-optim"
  else
    for s in $LOOP_AND_AFTER; do
      skip "$s" 60 "no prepared dataset at DATA=$DATA (meta.json missing)"
    done
  fi
fi

if [ -n "${DRY_RUN:-}" ]; then
  echo "output files (${#FILES[@]}, at most 8) in $OUT: ${FILES[*]}"
  exit 0
fi
for mode in eager compiled; do
  [ -f "$WORK/bench-$mode/bench.json" ] && cp "$WORK/bench-$mode/bench.json" "$OUT/bench-$mode.json"
done
timeout 25 "$PY" -m train.bench --gpu-check-report "$WORK" --out "$OUT" >> "$OUT/gpu_check.log" 2>&1 \
  || echo "gpu_check: the closing report failed; see $OUT/gpu_check.log" >&2
[ -f "$OUT/summary.md" ] && cat "$OUT/summary.md"
echo "gpu_check: done in $((SECONDS - START)) s; results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
