#!/usr/bin/env bash
# Every GPU figure of bench/README.md in one command, on a CUDA machine with JAX's CUDA plugin
# and a CUDA build of torch next to the project:
#
#   bench/run_gpu.sh OUTDIR [BUDGET_SECONDS]
#
# Runs, in order of importance, each with its own time limit, stopping before a step that would
# not fit in BUDGET_SECONDS (default 3600): the zero-shot benchmarks in float32 (true float32
# products in both frameworks) with the per-stage profile, in bfloat16 (JAX compute dtype, torch
# autocast), the JAX path with cuDNN attention, the training steps at B/16-224, the evaluation
# command end to end, and float32 with TF32 tensor cores in both. Each step's output goes to
# OUTDIR/<step>.log and its rows to OUTDIR/<step>.json. $PYTHON (default python3) runs them.
set -uo pipefail
OUT=${1:?usage: bench/run_gpu.sh OUTDIR [BUDGET_SECONDS]}
BUDGET=${2:-3600}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
START=$(date +%s)

step() {   # step NAME LIMIT_SECONDS SCRIPT ARGS...
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if (( left < 30 )); then echo "=== $name: skipped (budget spent)"; return; fi
  (( limit > left )) && limit=$left
  echo "=== $name (limit ${limit} s): $*"
  local t0=$(date +%s)
  timeout "$limit" "$PY" "$@" --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -E "^(#|\||benchmark|[a-z_0-9]+ +[0-9])" "$OUT/$name.log" | tail -40
  echo "=== $name: rc $rc, $(( $(date +%s) - t0 )) s"
  (( rc != 0 )) && tail -15 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import jax, flax, optax, torch, transformers; print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__, '| optax', optax.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"

ZS=(bench/bench_zero_shot.py --platform gpu --variants torch_eager,torch_compile,jax_1dev --groups 8)
step zs_f32 200 "${ZS[@]}" --rounds 5 --profile
step zs_bf16 180 "${ZS[@]}" --rounds 5 --dtype bfloat16
step zs_bf16_cudnn 120 bench/bench_zero_shot.py --platform gpu --variants jax_1dev --groups 8 \
  --rounds 5 --dtype bfloat16 --attention_impl cudnn
step steps_f32 240 bench/bench_steps.py --batch 32 --groups 4 --runs 5 --no_flops_variants
step evaluate_f32 240 bench/bench_evaluate.py --platform gpu
step steps_bf16 200 bench/bench_steps.py --batch 32 --groups 4 --runs 5 --no_flops_variants \
  --dtype bfloat16
step zs_tf32 180 "${ZS[@]}" --rounds 5 --precision tf32
echo "=== all done in $(( $(date +%s) - START )) s"
