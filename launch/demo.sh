#!/usr/bin/env bash
# The main job on the embedded demo data, from a fresh clone: builds .venv/py311 if needed, then runs the
# whole ClinKD recipe (configs/demo.py: teacher, distillation, SFT with RCT, evaluation).
#   bash launch/demo.sh [WORKDIR] [--config.a.b=value ...]
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
source "$ROOT/launch/env.sh"
WORKDIR=${1:-/tmp/clinkd_demo}
shift || true
setup_env 3.11 .venv/py311 || exit 1
exec .venv/py311/bin/python -m clinkd_jax.main --config=configs/demo.py --workdir="$WORKDIR" "$@"
