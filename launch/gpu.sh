#!/usr/bin/env bash
# Run a clinkd_jax config with one process per GPU on this machine (jax.distributed, coordinator on
# 127.0.0.1), or one process per GPU across machines (--coordinator host:port --node-rank k --nodes n).
#
#   bash launch/gpu.sh --gpus 8 --config configs/clinkd_qwen2vl_7b.py --workdir /runs/clinkd [--dry-run] [-- --config.a.b=v ...]
#   # two machines, 8 GPUs each, run on both:
#   bash launch/gpu.sh --gpus 8 --nodes 2 --node-rank 0 --coordinator 10.0.0.1:12355 --config ... --workdir ...
#
# --xla-flags PRESET puts XLA GPU flags in front of your own XLA_FLAGS (yours win where both set one):
#   lhs (default)  --xla_gpu_enable_latency_hiding_scheduler=true: collectives overlap compute (as NVIDIA's
#                  JAX images set it); changes the schedule only, never the math
#   lhs_cublas     also --xla_gpu_enable_triton_gemm=false: every matmul through cuBLAS instead of Triton
#   none           nothing added
# bench/device_check.sh measures the three on the train step (bench/history.md); every run logs the
# XLA_FLAGS it ran with ("running on ..." line).
# --dry-run prints the per-process commands instead of starting them. With --gpus 1 and one node the
# plain single-process command runs (no jax.distributed). Logs: <workdir>/logs/process_<id>.log.
# SIGTERM / SIGINT to this script go to every process it started (a preempted machine: the run saves one
# checkpoint at the same step on every host and stops). The workdir must be shared by all nodes (NFS,
# a gcsfuse mount with --config.checkpoint.commit_files=True): Orbax writes every host's shards there.
set -euo pipefail
GPUS=1 NODES=1 RANK=0 COORD="" CONFIG="" WORKDIR="" DRY=0 PY="${PYTHON:-python3}" PRESET=lhs
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus) GPUS=$2; shift 2 ;; --nodes) NODES=$2; shift 2 ;; --node-rank) RANK=$2; shift 2 ;;
    --coordinator) COORD=$2; shift 2 ;; --config) CONFIG=$2; shift 2 ;; --workdir) WORKDIR=$2; shift 2 ;;
    --xla-flags) PRESET=$2; shift 2 ;; --dry-run) DRY=1; shift ;; --) shift; break ;;
    *) echo "unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
[ -n "$CONFIG" ] && [ -n "$WORKDIR" ] || { echo "need --config and --workdir (see the header of $0)" >&2; exit 2; }
case "$PRESET" in
  none) FLAGS="" ;;
  lhs) FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true" ;;
  lhs_cublas) FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false" ;;
  *) echo "--xla-flags $PRESET: not one of none | lhs | lhs_cublas" >&2; exit 2 ;;
esac
FLAGS="$FLAGS${FLAGS:+${XLA_FLAGS:+ }}${XLA_FLAGS:-}"  # the user's own flags last: XLA takes a flag's last value
cd "$(dirname "$0")/.."
TOTAL=$((GPUS * NODES))
if [ "$TOTAL" = 1 ]; then
  CMD=(env "XLA_FLAGS=$FLAGS" "$PY" -m clinkd_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" "$@")
  if [ "$DRY" = 1 ]; then printf '%q ' "${CMD[@]}"; echo; exit 0; fi
  exec "${CMD[@]}"
fi
[ -n "$COORD" ] || COORD="127.0.0.1:$((12000 + RANDOM % 20000))"
[ "$DRY" = 1 ] || mkdir -p "$WORKDIR/logs"
PIDS=()
for ((g = 0; g < GPUS; g++)); do
  ID=$((RANK * GPUS + g))
  CMD=(env CUDA_VISIBLE_DEVICES=$g "XLA_FLAGS=$FLAGS" "$PY" -m clinkd_jax.main "--config=$CONFIG" "--workdir=$WORKDIR"
       "--coordinator_address=$COORD" "--num_processes=$TOTAL" "--process_id=$ID" "$@")
  if [ "$DRY" = 1 ]; then printf '%q ' "${CMD[@]}"; echo; continue; fi
  "${CMD[@]}" >"$WORKDIR/logs/process_$ID.log" 2>&1 &
  PIDS+=($!)
done
[ "$DRY" = 1 ] && exit 0
trap 'kill -TERM "${PIDS[@]}" 2>/dev/null' TERM INT
STATUS=0
for p in "${PIDS[@]}"; do
  while true; do  # `wait` returns early when a trapped signal arrives: wait again for the exit status
    rc=0; wait "$p" || rc=$?
    kill -0 "$p" 2>/dev/null || break
  done
  [ "$rc" = 0 ] || STATUS=$rc
done
[ "$STATUS" = 0 ] || echo "a process failed (exit $STATUS); see $WORKDIR/logs/" >&2
exit $STATUS
