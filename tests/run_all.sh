#!/usr/bin/env bash
# The test command: builds both environments from scratch (or refreshes them) and runs the suite in each.
#
#   bash tests/run_all.sh            # Python 3.11 (jax 0.10.x + torch 2.13.0 CPU, live parity)
#                                    # and Python 3.12 (newest jax, no torch, golden files)
#   CLINKD_PYTHONS=3.11 bash tests/run_all.sh     # only one of them
#   bash tests/run_all.sh -k parity               # extra arguments go to pytest
#
# Environments live in .venv/py311 and .venv/py312 (git-ignored).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHONS=${CLINKD_PYTHONS:-"3.11 3.12"}
LOG_DIR=${CLINKD_LOG_DIR:-$ROOT/.venv/logs}
mkdir -p "$LOG_DIR"

source "$ROOT/launch/env.sh"

status=0
summary=()
for v in $PYTHONS; do
  venv=".venv/py${v/./}"
  start=$(date +%s)
  if ! setup_env "$v" "$venv"; then
    summary+=("Python $v: environment set-up FAILED")
    status=1
    continue
  fi
  marker=()
  [ "$v" = "3.11" ] || marker=(-m "not torch")  # only the 3.11 environment has torch
  echo "== Python $v: $("$venv/bin/python" -c 'import sys, jax, flax; print(sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__)')"
  "$venv/bin/python" -m pytest "${marker[@]}" "$@" 2>&1 | tee "$LOG_DIR/pytest-py${v/./}.log"
  rc=${PIPESTATUS[0]}
  summary+=("Python $v: pytest exit $rc in $(( $(date +%s) - start ))s — $(grep -E '^(=+ )?[0-9]+ (passed|failed)' "$LOG_DIR/pytest-py${v/./}.log" | tail -1 | tr -d '=')")
  [ "$rc" -eq 0 ] || status=1
done

echo
echo "== summary"
printf '%s\n' "${summary[@]}"
exit $status
