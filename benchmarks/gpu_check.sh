#!/usr/bin/env bash
# Every GPU check of uamt_fast in one run, under 8 minutes on one H100; a short table is printed last.
#
#   benchmarks/gpu_check.sh OUT_DIR [--cpu] [--data DIR]
#
#   OUT_DIR   gets the full logs and one JSON of every number (8 files, small):
#             gpu_check.json  summary.txt  correctness.log  micro.log  micro.json
#             train_step.log  train_step.json  train.log
#   --cpu     dry run of the same wiring on the CPU at tiny sizes (fused rows in the Triton
#             interpreter, train step and training at 32^3 crops): checks the script, not the speed.
#   --data    LA data for the train-step A/B and the training run: a `python -m uamt_fast.data pack`
#             folder (default benchmarks/la_pack, see benchmarks/README.md for the one prep command)
#             or the LA release root. With --cpu and no --data, a small pack of the LA release at
#             ../shared/data/LA (or UAMT_LA_ROOT; a synthetic set when absent) is made in a temp folder.
#
# Steps (each under its own time limit, each logged; a failing step does not stop the next):
#   1. correctness  tests/test_uncertainty_loss.py + tests/test_ema.py on the device (kernels vs the
#                   float64 reference, edge cases, determinism, compile)                       80 s
#   2. micro        python -m pytest benchmarks/ (loss, entropy, EMA, data rows; ceilings)    150 s
#   3. train step   python -m benchmarks.train_step (reference vs ours and ablations)        140 s
#   4. training     python train.py, 1000 iterations on the pack, then its evaluation        100 s
#   5. report       merge into gpu_check.json, print the table
set -uo pipefail

usage() { echo "usage: $0 OUT_DIR [--cpu] [--data DIR]" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
OUT=$1; shift
MODE=gpu
DATA=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --cpu) MODE=cpu; shift ;;
    --data) [[ $# -ge 2 ]] || usage; DATA=$2; shift 2 ;;
    *) usage ;;
  esac
done

cd "$(dirname "$0")/.."
REPO=$(pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
WORK=$(mktemp -d -t uamt_gpu_check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
T0=$(date +%s)
STATUS="$WORK/status.tsv"   # step <tab> exit code <tab> seconds
: > "$STATUS"

# run_step NAME LIMIT_S LOG -- command...: time-limited, logged (stdout+stderr), status recorded.
run_step() {
  local name=$1 limit=$2 log=$3; shift 4
  local t=$(date +%s)
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t ))
  printf '%s\t%s\t%s\n' "$name" "$rc" "$dt" >> "$STATUS"
  echo "   -> exit $rc after ${dt}s" | tee -a "$log"
  [[ $rc -eq 124 || $rc -eq 137 ]] && echo "   (stopped at its ${limit}s limit)" | tee -a "$log"
  return 0
}

if [[ $MODE == gpu ]]; then
  if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device (use --cpu for the dry run)" >&2; exit 2
  fi
  if [[ ${TRITON_INTERPRET:-} == 1 ]]; then
    echo "gpu_check: TRITON_INTERPRET=1 is set; unset it, the kernels must run compiled on the GPU" >&2; exit 2
  fi
  DATA=${DATA:-benchmarks/la_pack}
  MICRO_ENV=()
  TRAIN_ENV=()
  LIM_TEST=80; LIM_MICRO=150; LIM_STEP=140; LIM_TRAIN=100
  STEP_ARGS=(--budget-s 80)
  TRAIN_ARGS=(--iterations 1000 --log-every 100 --save-every 1000)
  MICRO_ARGS=(--benchmark-max-time=0.1 --benchmark-min-rounds=3)  # the rows' own numbers are CUDA-event medians
else
  # CPU dry run: the kernel tests (tests/conftest.py sets it) and the fused micro rows run in the
  # Triton interpreter; the train step and the training run use the CPU fallbacks (the interpreter
  # would take minutes per iteration).
  MICRO_ENV=(TRITON_INTERPRET=1)
  TRAIN_ENV=(OMP_NUM_THREADS=1)  # one thread: a shared CPU is oversubscribed otherwise
  if [[ -z $DATA ]]; then  # a small pack of the real data when it is here, else a synthetic set
    LA=${UAMT_LA_ROOT:-$REPO/../shared/data/LA}
    if [[ -f $LA/train.list ]]; then
      echo "== pack a small LA subset for the dry run (4 + 2 train ids, 1 test id of $LA)" | tee -a "$OUT/train.log"
      $PY -m uamt_fast.data pack "$LA" "$WORK/pack" --train 4 --unlabeled 2 --test 1 >> "$OUT/train.log" 2>&1
    else
      echo "== no LA data at $LA: a synthetic set for the dry run" | tee -a "$OUT/train.log"
      $PY -m uamt_fast.data synth "$WORK/pack" --train 6 --test 1 --shape 96 96 64 >> "$OUT/train.log" 2>&1
    fi
    DATA=$WORK/pack
  fi
  LIM_TEST=600; LIM_MICRO=600; LIM_STEP=600; LIM_TRAIN=600
  STEP_ARGS=(--cpu --labeled 2 --threads 1)  # one thread: a shared CPU is oversubscribed otherwise
  TRAIN_ARGS=(--device cpu --iterations 6 --log-every 3 --save-every 6 --labeled 2 --patch 32 32 32
              --n-filters 4 --downsample 2 --eval-stride-xy 16 --eval-stride-z 16 --no-compile)
  MICRO_ARGS=(--bench-tiny --benchmark-max-time=0.05 --benchmark-min-rounds=1)
fi

if [[ -n $DATA && ! -f $DATA/train.list ]]; then
  echo "gpu_check: no train.list in data folder '$DATA': the train-step A/B and the training run are skipped" \
       "(prepare it as benchmarks/README.md says)" | tee -a "$OUT/train.log" >&2
  DATA=""
fi

# Header: device, driver, versions (also the first lines of correctness.log).
{
  echo "gpu_check mode=$MODE data=${DATA:-<synthetic>} started $(date -u +%FT%TZ) in $REPO"
  git -C "$REPO" log -1 --format='commit %H %s' 2>/dev/null || true
  [[ $MODE == gpu ]] && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| triton', triton.__version__, '| cuda', torch.version.cuda, '| cudnn', torch.backends.cudnn.version())"
} > "$OUT/correctness.log" 2>&1
cat "$OUT/correctness.log"

# 1. kernel correctness on the device against the float64 reference (edge cases included).
run_step correctness $LIM_TEST "$OUT/correctness.log" -- \
  $PY -m pytest tests/test_uncertainty_loss.py tests/test_ema.py -q -ra -p no:cacheprovider

# 2. micro-benchmarks (loss fwd / fwd+bwd, entropy, EMA) with the copy-bandwidth ceiling.
run_step micro $LIM_MICRO "$OUT/micro.log" -- env "${MICRO_ENV[@]}" ${DATA:+UAMT_LA_ROOT="$DATA"} \
  $PY -m pytest benchmarks/ -q -p no:cacheprovider "${MICRO_ARGS[@]}" --bench-json "$OUT/micro.json"

# 3. train-step A/B: the released iteration vs ours, each option off in turn.
if [[ -n $DATA ]]; then
  run_step train_step $LIM_STEP "$OUT/train_step.log" -- \
    $PY -m benchmarks.train_step --data "$DATA" "${STEP_ARGS[@]}" --json "$OUT/train_step.json"
else
  printf 'train_step\tskipped\t0\n' >> "$STATUS"
fi

# 4. a short real-data training run and its test Dice (the run folder stays out of OUT: checkpoints are big).
if [[ -n $DATA ]]; then
  run_step training $LIM_TRAIN "$OUT/train.log" -- env "${TRAIN_ENV[@]}" \
    $PY train.py --data "$DATA" --out "$WORK/run" "${TRAIN_ARGS[@]}"
  cp "$WORK/run/eval.json" "$WORK/eval.json" 2>/dev/null || true
  cp "$WORK/run/metrics.jsonl" "$WORK/metrics.jsonl" 2>/dev/null || true
else
  echo "training: skipped, no --data and no benchmarks/la_pack" | tee -a "$OUT/train.log"
  printf 'training\tskipped\t0\n' >> "$STATUS"
fi

# 5. one JSON of every number, and the short table (printed last).
$PY -m benchmarks.gpu_check_report "$OUT" --status "$STATUS" --work "$WORK" --mode $MODE \
  --elapsed $(( $(date +%s) - T0 ))
