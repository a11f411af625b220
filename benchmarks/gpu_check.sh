#!/usr/bin/env bash
# The GPU checks of uamt_fast, in stages that each fit one device call; a short table is printed last.
#
#   benchmarks/gpu_check.sh OUT_DIR [--stage STAGES] [--cpu] [--data DIR]...  (options in any order)
#
#   OUT_DIR   gets each stage's logs and JSON (small files), status.tsv (stage, step, exit code,
#             seconds), gpu_check.json (every number of the stages found in OUT_DIR) and summary.txt.
#   --stage   comma-separated, run in this order (default all = kernels,step,training):
#             kernels   <= 7 min on an H100 (4 expected): the kernels' correctness, launch configs, speed
#                       1. tests/ops/test_uncertainty_loss.py tests/ops/test_ema.py on the device: kernels vs
#                          the float64 reference (tests/kernels/test_kernel_structure.py compiles for sm_90
#                          on any CPU, so CI runs it; it is left out here: ~30-50 s of ptxas)       90 s
#                       2. python -m benchmarks.kernel_sweep (launch configs; when present)        55 s
#                       3. micro rows: loss, entropy, EMA, 3D and 2D shapes; kernel time and
#                          eager wall-clock                                                       240 s
#             step      <= 8 min: the train step against the released trainer's, and its profile
#                       1. python -m benchmarks.train_step, every variant and both references    350 s
#                       2. python -m benchmarks.profile_step (the step's profile; when present)     95 s
#             training  <= 10 min: python train.py --data DIR, the paper's 6000 iterations, then the
#                       evaluation of the data's test cases; wall clock includes the cold start  540 s
#   --cpu     dry run of the same stages on the CPU at tiny sizes (kernel tests and fused rows in the
#             Triton interpreter, 32^3 crops, a 6-iteration run): checks the script, not the speed.
#   --data    LA data for the step and training stages: a `python -m uamt_fast.data pack` folder
#             (default benchmarks/la_pack, see benchmarks/README.md for the one prep command) or the LA
#             release root; repeat it for a data set in parts (--data A --data B, passed on as given).
#             With --cpu and no --data, a small pack of ../shared/data/LA (or UAMT_LA_ROOT; a synthetic
#             set when absent) is made in a temp folder.
#
# Each step has its own time limit and log; a step that fails or hits its limit is reported as such and
# the next one still runs. Steps whose script is absent (written in parallel by other changes) are
# reported as skipped. Report alone, over one or more OUT_DIRs: python -m benchmarks.gpu_check_report DIR...
set -uo pipefail

usage() { echo "usage: $0 OUT_DIR [--stage kernels,step,training|all] [--cpu] [--data DIR]..." >&2; exit 2; }
OUT=""
MODE=gpu
DATA=()   # one folder, or the parts of a data set
STAGES=all
while [[ $# -gt 0 ]]; do
  case $1 in
    --cpu) MODE=cpu; shift ;;
    --data) [[ $# -ge 2 ]] || usage; DATA+=("$2"); shift 2 ;;
    --stage|--stages) [[ $# -ge 2 ]] || usage; STAGES=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_check: unknown option '$1'" >&2; usage ;;
    *) [[ -z $OUT ]] || { echo "gpu_check: two output folders given ('$OUT', '$1')" >&2; usage; }; OUT=$1; shift ;;
  esac
done
[[ -n $OUT ]] || usage
[[ $STAGES == all ]] && STAGES=kernels,step,training
IFS=, read -r -a STAGE_LIST <<< "$STAGES"
for s in "${STAGE_LIST[@]}"; do
  case $s in
    kernels|step|training) ;;
    *) echo "gpu_check: unknown stage '$s' (kernels, step, training, all)" >&2; usage ;;
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
STATUS="$OUT/status.tsv"   # stage <tab> step <tab> exit code (or "skipped") <tab> seconds
touch "$STATUS"

# run_step STAGE NAME LIMIT_S LOG -- command...: time-limited, logged (stdout+stderr), status recorded.
run_step() {
  local stage=$1 name=$2 limit=$3 log=$4; shift 5
  local t=$(date +%s)
  echo "== $stage/$name (limit ${limit}s): $*" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t ))
  printf '%s\t%s\t%s\t%s\n' "$stage" "$name" "$rc" "$dt" >> "$STATUS"
  echo "   -> exit $rc after ${dt}s" | tee -a "$log"
  [[ $rc -eq 124 || $rc -eq 137 ]] && echo "   (stopped at its ${limit}s limit)" | tee -a "$log"
  return 0
}
skip_step() {  # STAGE NAME LOG REASON
  echo "== $1/$2: skipped, $4" | tee -a "$3"
  printf '%s\t%s\tskipped\t0\n' "$1" "$2" >> "$STATUS"
}

if [[ $MODE == gpu ]]; then
  if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device (use --cpu for the dry run)" >&2; exit 2
  fi
  if [[ ${TRITON_INTERPRET:-} == 1 ]]; then
    echo "gpu_check: TRITON_INTERPRET=1 is set; unset it, the kernels must run compiled on the GPU" >&2; exit 2
  fi
  [[ ${#DATA[@]} -gt 0 ]] || DATA=(benchmarks/la_pack)
  KERNEL_ENV=()
  CPU_ENV=()
  # The kernels stage's limits: the H100 run of 2026-11-27 (benchmarks/results/2026-11-27-h100) scaled to
  # today's work. Correctness: 74 tests took 39 s there (the sm_90 structure test, now left out, among them);
  # 113 now (wide offsets, masked blocks, launch-config overrides: ~10 more Triton builds of ~1-1.5 s each),
  # about 45-55 s, so 60 s left no room. Micro: 41 rows took 56 s there (4 reference signatures compiled);
  # 113 rows now (the 2D ACDC shapes 24 x 4 x 256 x 256, the trainer mix, compiled entropy rows) with 24
  # signatures for torch.compile (12 loss at ~4 s, 12 entropy at ~2 s, cold), ~16 Triton builds and ~0.35 s
  # of timing a row: about 120-150 s. 90 + 55 + 240 s keep the stage under 7 min; a step stopped at its limit
  # still keeps the rows measured so far.
  LIM_TEST=90; LIM_SWEEP=55; LIM_MICRO=240; LIM_STEP=350; LIM_PROFILE=95; LIM_TRAIN=540
  SWEEP_ARGS=(--budget-s 40)
  MICRO_ARGS=()                                # the rows' numbers come from their own timers
  STEP_ARGS=(--budget-s 280)                   # no new variant after 280 s; the one running finishes
  PROFILE_ARGS=()
  TRAIN_ARGS=()                                # the paper's run: every default
else
  # CPU dry run: the kernel tests (tests/conftest.py sets it) and the fused micro rows run in the
  # Triton interpreter; the train step, profile and training use the CPU paths at tiny sizes.
  KERNEL_ENV=(TRITON_INTERPRET=1)
  CPU_ENV=(OMP_NUM_THREADS=1)                  # one thread: a shared CPU is oversubscribed otherwise
  # no --data: a small pack of the real data when here, else a synthetic set
  if [[ ${#DATA[@]} -eq 0 && $STAGES =~ step|training ]]; then
    LA=${UAMT_LA_ROOT:-$REPO/../shared/data/LA}
    if [[ -f $LA/train.list ]]; then
      echo "== pack a small LA subset for the dry run (4 + 2 train ids, 1 test id of $LA)"
      $PY -m uamt_fast.data pack "$LA" "$WORK/pack" --train 4 --unlabeled 2 --test 1 > "$WORK/pack.log" 2>&1
    else
      echo "== no LA data at $LA: a synthetic set for the dry run"
      $PY -m uamt_fast.data synth "$WORK/pack" --train 6 --test 1 --shape 96 96 64 > "$WORK/pack.log" 2>&1
    fi
    DATA=("$WORK/pack")
  fi
  LIM_TEST=600; LIM_SWEEP=300; LIM_MICRO=600; LIM_STEP=600; LIM_PROFILE=300; LIM_TRAIN=600
  SWEEP_ARGS=(--cpu)
  MICRO_ARGS=(--bench-tiny --benchmark-max-time=0.05 --benchmark-min-rounds=1)
  STEP_ARGS=(--cpu --labeled 2 --threads 1)
  PROFILE_ARGS=(--cpu)
  TRAIN_ARGS=(--device cpu --iterations 6 --log-every 3 --save-every 6 --labeled 2 --patch 32 32 32
              --n-filters 4 --downsample 2 --eval-stride-xy 16 --eval-stride-z 16 --no-compile)
fi
# Every data folder must exist and at least one must hold train.list (the parts of a pack each hold it).
HAS_LIST=0; MISSING=()
for d in "${DATA[@]}"; do
  [[ -d $d ]] || MISSING+=("$d")
  [[ -f $d/train.list ]] && HAS_LIST=1
done
if [[ ${#DATA[@]} -gt 0 && ( ${#MISSING[@]} -gt 0 || $HAS_LIST -eq 0 ) ]]; then
  if [[ ${#MISSING[@]} -gt 0 ]]; then WHY="data folder(s) not found: ${MISSING[*]}"
  else WHY="no train.list in data folder(s) ${DATA[*]}"; fi
  echo "gpu_check: $WHY: the step and training stages are skipped (prepare it as benchmarks/README.md says)" >&2
  DATA=()
fi
DATA_ARGS=()
for d in "${DATA[@]}"; do DATA_ARGS+=(--data "$d"); done

# Header: stages, device, driver, versions.
{
  echo "gpu_check mode=$MODE stages=$STAGES data=${DATA[*]:-<none>} started $(date -u +%FT%TZ) in $REPO"
  git -C "$REPO" log -1 --format='commit %H %s' 2>/dev/null || true
  [[ $MODE == gpu ]] && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| triton', triton.__version__, '| cuda', torch.version.cuda, '| cudnn', torch.backends.cudnn.version())"
} >> "$OUT/header.log" 2>&1
tail -n 5 "$OUT/header.log"

stage_kernels() {
  # (not tests/kernels/test_kernel_structure.py: it compiles for sm_90 without a GPU and CI runs it; here it would
  #  spend ~30-50 s of the 60 s on ptxas)
  local tests=(tests/ops/test_uncertainty_loss.py tests/ops/test_ema.py)
  run_step kernels correctness $LIM_TEST "$OUT/correctness.log" -- \
    $PY -m pytest "${tests[@]}" -q -ra -p no:cacheprovider
  if [[ -f benchmarks/kernel_sweep.py ]]; then
    run_step kernels sweep $LIM_SWEEP "$OUT/sweep.log" -- env "${KERNEL_ENV[@]}" \
      $PY -m benchmarks.kernel_sweep "${SWEEP_ARGS[@]}" --json "$OUT/sweep.json"
  else
    skip_step kernels sweep "$OUT/sweep.log" "benchmarks/kernel_sweep.py is not in this tree"
  fi
  # EMA first: the loss and entropy rows compile per shape, and a stop at the limit keeps the rows so far.
  run_step kernels micro $LIM_MICRO "$OUT/micro.log" -- env "${KERNEL_ENV[@]}" \
    $PY -m pytest benchmarks/bench_ema.py benchmarks/bench_uncertainty_loss.py -q -p no:cacheprovider \
    "${MICRO_ARGS[@]}" --bench-json "$OUT/micro.json"
}

stage_step() {
  if [[ ${#DATA[@]} -eq 0 ]]; then skip_step step train_step "$OUT/train_step.log" "no data"; skip_step step profile \
    "$OUT/profile.log" "no data"; return; fi
  run_step step train_step $LIM_STEP "$OUT/train_step.log" -- env "${CPU_ENV[@]}" \
    $PY -m benchmarks.train_step "${DATA_ARGS[@]}" "${STEP_ARGS[@]}" --json "$OUT/train_step.json"
  if [[ -f benchmarks/profile_step.py ]]; then
    run_step step profile $LIM_PROFILE "$OUT/profile.log" -- env "${CPU_ENV[@]}" \
      $PY -m benchmarks.profile_step "${DATA_ARGS[@]}" "${PROFILE_ARGS[@]}" --out "$OUT/profile"
  else
    skip_step step profile "$OUT/profile.log" "benchmarks/profile_step.py is not in this tree"
  fi
}

stage_training() {
  if [[ ${#DATA[@]} -eq 0 ]]; then skip_step training train "$OUT/train.log" "no data"; return; fi
  # The run folder stays out of OUT (checkpoints are big); its small records are copied back.
  run_step training train $LIM_TRAIN "$OUT/train.log" -- env "${CPU_ENV[@]}" \
    $PY train.py "${DATA_ARGS[@]}" --out "$WORK/run" "${TRAIN_ARGS[@]}"
  for f in config.json metrics.jsonl eval.json; do cp "$WORK/run/$f" "$OUT/$f" 2>/dev/null || true; done
}

for s in "${STAGE_LIST[@]}"; do "stage_$s"; done

# One JSON of every number found in OUT (earlier calls' stages included), and the short table (printed last).
$PY -m benchmarks.gpu_check_report "$OUT" --mode $MODE --elapsed $(( $(date +%s) - T0 ))
