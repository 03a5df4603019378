#!/usr/bin/env bash
# The test command: builds both environments from scratch (or refreshes them), lints (ruff: unused imports,
# import order, line length 120; pyproject.toml) and runs the suite in each.
#
#   bash tests/run_all.sh            # Python 3.11 (jax 0.10.x + torch 2.13.0 CPU: live parity, marker `torch`,
#                                    # and the in-process end-to-end runs, marker `e2e`)
#                                    # and Python 3.12 (newest jax, as on TPU VMs and Colab; no torch, golden
#                                    # files; everything else, among it the multi-process and launcher runs,
#                                    # marker `multihost`; the fault runs, marker `faults`; the web page, markers
#                                    # `serve` and `browser`, Chromium installed with apt-get when root)
#   CLINKD_PYTHONS=3.11 bash tests/run_all.sh     # only one of them
#   bash tests/run_all.sh -k parity               # extra arguments go to pytest
#   CLINKD_NEWEST=1 bash tests/run_all.sh         # against the newest releases setup.cfg allows (what a TPU VM
#                                                 # or Colab installs), in .venv/py3XX-newest; prints what it took
#
# Environments live in .venv/py311 and .venv/py312 (git-ignored), with the versions of launch/constraints/ (what
# CI passed with; launch/lock.sh writes them).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHONS=${CLINKD_PYTHONS:-"3.11 3.12"}
LOG_DIR=${CLINKD_LOG_DIR:-$ROOT/.venv/logs}
mkdir -p "$LOG_DIR"

source "$ROOT/launch/env.sh"

ensure_chromium() {  # Debian's Chromium for the browser test; without it that test is skipped and says why
  [ -x /usr/bin/chromium ] && return
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing chromium (apt-get) for the browser test"
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } >"$LOG_DIR/apt-chromium.log" 2>&1 \
      || echo "   chromium did not install ($LOG_DIR/apt-chromium.log); the browser test will be skipped"
  else
    echo "== /usr/bin/chromium missing and not root: the browser test will be skipped (apt-get install chromium)"
  fi
}

status=0
summary=()
mode=locked
[ -n "${CLINKD_NEWEST:-}" ] && mode=newest
for v in $PYTHONS; do
  venv=".venv/py${v/./}"
  [ "$mode" = newest ] && venv="$venv-newest"
  start=$(date +%s)
  if ! setup_env "$v" "$venv" "$mode"; then
    summary+=("Python $v: environment set-up FAILED")
    status=1
    continue
  fi
  if [ "$mode" = newest ]; then  # what it took, against the lock
    taken=$("$venv/bin/python" -m pip freeze --exclude-editable | "$venv/bin/python" launch/constraints/compare.py \
      "$(constraints_file "$v")")
    echo "== Python $v, newest releases: $taken"
    summary+=("Python $v newest: $taken")
  fi
  # Each test runs under one Python, so that both fit the CI budget on a 2-core CPU:
  #   3.11 (jax 0.10, torch): the live comparisons with transformers (marker torch) and the in-process end-to-end
  #        runs (marker e2e: recipes, the training loop, evaluation, RCT, pseudo-labels, predict, DICOM folders);
  #   3.12 (newest jax, libtpu, gradio): everything else: models, data, sharding, generation, losses, steps, and
  #        the same stack end to end through commands (markers multihost, faults, serve, tpu_aot, user errors).
  # So each jax version runs the whole stack once. Extra arguments come after these: a `-m` of yours replaces
  # the split (`bash tests/run_all.sh -m 'not torch'` with CLINKD_PYTHONS=3.12 runs every other test there).
  if [ "$v" = "3.11" ]; then marker=(-m "(torch or e2e) and not multihost and not tpu_aot and not faults and not serve")
  else marker=(-m "not torch and not e2e"); fi
  if [ "$v" = "3.12" ]; then ensure_chromium; fi  # the web page's browser test (marker browser)
  if [ -z "${linted:-}" ]; then
    linted=1
    if "$venv/bin/ruff" check .; then summary+=("ruff: clean"); else summary+=("ruff: FAILED"); status=1; fi
  fi
  echo "== Python $v: $("$venv/bin/python" -c 'import sys, jax, flax; print(sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__)')"
  # two workers, one test file each at a time (module fixtures stay per file)
  # --durations: the slowest tests in every log, to keep the suite within its time budget
  # a fresh compilation cache per run, shared by both workers (tests/conftest.py says why)
  cache="$ROOT/.venv/jax-cache-py${v/./}"; rm -rf "$cache"
  JAX_COMPILATION_CACHE_DIR=$cache "$venv/bin/python" -m pytest -n 2 --dist loadfile --durations=20 "${marker[@]}" "$@" 2>&1 | tee "$LOG_DIR/pytest-py${v/./}.log"
  rc=${PIPESTATUS[0]}
  summary+=("Python $v: pytest exit $rc in $(( $(date +%s) - start ))s — $(grep -E '^(=+ )?[0-9]+ (passed|failed)' "$LOG_DIR/pytest-py${v/./}.log" | tail -1 | tr -d '=')")
  [ "$rc" -eq 0 ] || status=1
done

echo
echo "== summary"
printf '%s\n' "${summary[@]}"
exit $status
