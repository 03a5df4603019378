#!/usr/bin/env bash
# Run a clinkd_jax config on a Cloud TPU VM or pod slice: create it (unless it exists), ship this checkout
# to every worker, install, and run the same command on all workers (jax.distributed auto-detects the pod).
#
#   bash launch/tpu.sh --name clinkd-v5e --zone us-west4-a --type v5litepod-16 --bucket gs://my-bucket/runs \
#        --config configs/clinkd_qwen2vl_7b.py [--run-name NAME] [--version tpu-ubuntu2204-base] [--python 3.12] \
#        [--spot] [--dry-run] [-- --config.a.b=v ...]
#
# On every worker:
#   ~/clinkd_jax     this checkout as it is (tracked and untracked files, not the git-ignored ones)
#   ~/clinkd_venv    Python --python (default 3.12) made by uv, whatever Python the image ships, with
#                    clinkd_jax[eval,wandb] and jax[tpu]
#   ~/.clinkd_env    the Weights & Biases variables set where this script runs (WANDB_API_KEY, WANDB_MODE,
#                    WANDB_BASE_URL, WANDB_ENTITY), readable by the worker's user only; the run reads it (a key
#                    never goes on a command line)
#   ~/gcs/<bucket>   the bucket, mounted with gcsfuse. The workdir is ~/gcs/<bucket>/<path>/<run name>: one
#                    folder all workers share, as Orbax needs (every host writes its own shards of a
#                    checkpoint) and as chained stages need (each host reads the params an earlier stage
#                    wrote); checkpoints commit with a marker file (no directory renames on gcsfuse).
# Overrides after `--` reach the run exactly as typed (tuples, spaces, quotes). --dry-run prints every
# command instead of running it (no gcloud needed). Everything ends up in gs://<bucket>/<path>/<run name>.
set -euo pipefail
NAME="" ZONE="" TYPE="" BUCKET="" CONFIG="" RUN_NAME="" VERSION="tpu-ubuntu2204-base" PY="3.12" SPOT=() DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME=$2; shift 2 ;; --zone) ZONE=$2; shift 2 ;; --type) TYPE=$2; shift 2 ;;
    --bucket) BUCKET=$2; shift 2 ;; --config) CONFIG=$2; shift 2 ;; --run-name) RUN_NAME=$2; shift 2 ;;
    --version) VERSION=$2; shift 2 ;; --python) PY=$2; shift 2 ;; --spot) SPOT=(--spot); shift ;;
    --dry-run) DRY=1; shift ;; --) shift; break ;;
    *) echo "unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
for v in NAME ZONE TYPE BUCKET CONFIG; do
  [ -n "${!v}" ] || { echo "missing --$(echo "$v" | tr A-Z a-z) (see the header of $0)" >&2; exit 2; }
done
case "$BUCKET" in gs://?*) ;; *) echo "--bucket must be gs://<bucket>[/path], got $BUCKET" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
[ -f "$CONFIG" ] || { echo "--config $CONFIG: no such file in this checkout" >&2; exit 2; }
BUCKET_NAME=${BUCKET#gs://}; BUCKET_NAME=${BUCKET_NAME%%/*}
PREFIX=${BUCKET#gs://"$BUCKET_NAME"}; PREFIX=${PREFIX#/}; PREFIX=${PREFIX%/}
RUN_NAME=${RUN_NAME:-$NAME-$(date +%Y%m%d-%H%M%S)}
MOUNT="\$HOME/gcs/$BUCKET_NAME"                      # expanded on the worker
WORKDIR="$MOUNT/${PREFIX:+$PREFIX/}$RUN_NAME"

run() {  # a command, or (dry run) the command as one could paste it
  if [ "$DRY" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
on_workers() { run gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "$1"; }

if [ "$DRY" = 1 ] || ! gcloud compute tpus tpu-vm describe "$NAME" --zone "$ZONE" >/dev/null 2>&1; then
  run gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" --accelerator-type "$TYPE" --version "$VERSION" "${SPOT[@]}"
fi
SRC=$(mktemp -d)/clinkd_jax_src.tgz
trap 'rm -rf "${SRC%/*}"' EXIT  # the local copy of the sources: gone once they are on the workers
if [ "$DRY" = 1 ]; then echo "git ls-files -z -co --exclude-standard | tar --null -czf $SRC -T -"
else git ls-files -z -co --exclude-standard | tar --null --ignore-failed-read -czf "$SRC" -T - 2>/dev/null; fi
run gcloud compute tpus tpu-vm scp "$SRC" "$NAME:~/clinkd_jax_src.tgz" --zone "$ZONE" --worker=all
ENV_FILE=${SRC%/*}/clinkd_env
(umask 077; : > "$ENV_FILE")
for v in WANDB_API_KEY WANDB_MODE WANDB_BASE_URL WANDB_ENTITY; do
  if [ -n "${!v:-}" ]; then printf 'export %s=%q\n' "$v" "${!v}" >> "$ENV_FILE"; fi
done
run gcloud compute tpus tpu-vm scp "$ENV_FILE" "$NAME:~/.clinkd_env" --zone "$ZONE" --worker=all

# one set-up script for every worker; $HOME and $PATH are the worker's
on_workers "set -euo pipefail
chmod 600 ~/.clinkd_env
rm -rf ~/clinkd_jax && mkdir -p ~/clinkd_jax && tar -xzf ~/clinkd_jax_src.tgz -C ~/clinkd_jax
export PATH=\$HOME/.local/bin:\$PATH
command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
uv venv --allow-existing --python $(printf %q "$PY") ~/clinkd_venv
uv pip install --python ~/clinkd_venv/bin/python -e \"\$HOME/clinkd_jax[eval,wandb]\" 'jax[tpu]'
if ! command -v gcsfuse >/dev/null; then
  echo \"deb https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /etc/apt/trusted.gpg.d/gcsfuse.asc >/dev/null
  sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
fi
mkdir -p \"$MOUNT\"
mountpoint -q \"$MOUNT\" || gcsfuse --implicit-dirs $(printf %q "$BUCKET_NAME") \"$MOUNT\""

# the run: the same command on every worker; each argument quoted for the worker's shell
ARGS=$(printf '%q ' "--config=$CONFIG" --config.checkpoint.commit_files=True "$@")  # overrides last: they win
on_workers "cd ~/clinkd_jax && . ~/.clinkd_env && ~/clinkd_venv/bin/python -m clinkd_jax.main --distributed \
--workdir=\"$WORKDIR\" $ARGS"

echo "outputs: gs://$BUCKET_NAME/${PREFIX:+$PREFIX/}$RUN_NAME"
echo "delete the TPU with: gcloud compute tpus tpu-vm delete $NAME --zone $ZONE"
