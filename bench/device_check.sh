#!/usr/bin/env bash
# Issue 12's accelerator checks in two device calls of at most ~5.5 minutes each (one H100; the device
# budget is 15 minutes with the machine's start), each step bounded so a slow one cannot eat the rest:
#   1. baseline, both frameworks side by side: `--size large`, SFT and KD, MFU both ways
#   2. the levers one by one, JAX only, same geometry: remat policies, cuDNN attention, bf16 first moment,
#      the XLA flag presets of launch/gpu.sh (none / lhs / lhs_cublas; the bench itself runs with none)
#   3. the full-depth 2B geometry (seq 2048) at the remat policy that fits, both frameworks
#   4. the 7B -> 2B KD memory plan on this device (largest batch, online teacher and pseudo-labels)
#   5. the GPU-only test: cuDNN attention against XLA
# Everything is appended to $OUT/device_check.log (the device tool's result folder; /tmp otherwise).
#
#   bash bench/device_check.sh levers      # steps 1-2 (~330 s at most)
#   bash bench/device_check.sh full_depth  # steps 3-5 (~330 s at most)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
LOG="$OUT/device_check.log"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
step() {  # step <seconds> <command...>
  local limit=$1; shift
  echo "== $(date +%T) $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG" | grep -E "^(machine|size|clinkd_jax:|step |sft |kd |online|pseudo|[0-9]+ (passed|failed)|FAILED)|x, peak|failed" || true
}
step 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
case "${1:-levers}" in
  levers)
    step 120 "$PY" bench/train_step.py --size large --steps 5
    for lever in "--remat minimal_with_context" "--attention cudnn" "--mu-dtype bfloat16"; do
      # shellcheck disable=SC2086  # the lever is two words on purpose
      step 45 "$PY" bench/train_step.py --size large --steps 5 --frameworks jax $lever
    done
    step 45 env XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true \
      "$PY" bench/train_step.py --size large --steps 5 --frameworks jax
    step 45 env "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false" \
      "$PY" bench/train_step.py --size large --steps 5 --frameworks jax ;;
  full_depth)
    step 150 "$PY" bench/train_step.py --size 2b --steps 3 --remat minimal_with_context
    step 120 "$PY" bench/kd_memory.py --remat none,minimal_with_context,full --max-rows 16
    step 50 "$PY" -m pytest -q -p no:cacheprovider tests/models/test_model.py -k "cudnn or attention_impls" ;;
  *) echo "unknown part $1: levers | full_depth" >&2; exit 2 ;;
esac
