#!/usr/bin/env bash
# Run a clinkd_jax config on a Cloud TPU VM or pod slice: create it (unless it exists), install this
# checkout on every worker, run the same command on all workers (jax.distributed auto-detects the pod;
# each host reads its own slice of the data), then copy the workdir of worker 0 to a bucket.
#
#   bash launch/tpu.sh --name clinkd-v5e --zone us-west4-a --type v5litepod-16 --bucket gs://my-bucket/runs \
#        --config configs/clinkd_qwen2vl_7b.py [--version v2-alpha-tpuv5-lite] [--spot] [--dry-run] [-- --config.a.b=v ...]
#
# --dry-run prints every command instead of running it (no gcloud needed).
set -euo pipefail
NAME="" ZONE="" TYPE="" BUCKET="" CONFIG="" VERSION="tpu-ubuntu2204-base" SPOT="" DRY=0 WORKDIR="/tmp/clinkd_run"
while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME=$2; shift 2 ;; --zone) ZONE=$2; shift 2 ;; --type) TYPE=$2; shift 2 ;;
    --bucket) BUCKET=$2; shift 2 ;; --config) CONFIG=$2; shift 2 ;; --version) VERSION=$2; shift 2 ;;
    --workdir) WORKDIR=$2; shift 2 ;; --spot) SPOT="--spot"; shift ;; --dry-run) DRY=1; shift ;;
    --) shift; break ;;
    *) echo "unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
for v in NAME ZONE TYPE BUCKET CONFIG; do
  [ -n "${!v}" ] || { echo "missing --$(echo $v | tr A-Z a-z) (see the header of $0)" >&2; exit 2; }
done
OVERRIDES="$*"
RUN_NAME="${NAME}-$(date +%Y%m%d-%H%M%S)"

run() { if [ "$DRY" = 1 ]; then printf '%s\n' "$*"; else eval "$@"; fi; }
on_all() { run gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "'$1'"; }

if [ "$DRY" = 1 ] || ! gcloud compute tpus tpu-vm describe "$NAME" --zone "$ZONE" >/dev/null 2>&1; then
  run gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" --accelerator-type "$TYPE" --version "$VERSION" $SPOT
fi
# the checkout travels as a tarball (no git remote needed); the same files on every worker
run "git archive --format=tar.gz -o /tmp/clinkd_jax_src.tgz HEAD"
run gcloud compute tpus tpu-vm scp /tmp/clinkd_jax_src.tgz "$NAME:~/" --zone "$ZONE" --worker=all
on_all "mkdir -p ~/clinkd_jax && tar -xzf ~/clinkd_jax_src.tgz -C ~/clinkd_jax && cd ~/clinkd_jax && python3 -m pip install -q -U pip && python3 -m pip install -q -e \".[eval]\" \"jax[tpu]\""
on_all "cd ~/clinkd_jax && python3 -m clinkd_jax.main --distributed --config=$CONFIG --workdir=$WORKDIR $OVERRIDES"
run gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=0 --command "'gcloud storage cp -r $WORKDIR $BUCKET/$RUN_NAME'"
echo "workdir of worker 0 -> $BUCKET/$RUN_NAME ; delete the TPU with: gcloud compute tpus tpu-vm delete $NAME --zone $ZONE"
