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

is_version() { "$1" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$2'.split('.'))))" >/dev/null 2>&1; }

find_python() {  # $1 = 3.11 | 3.12 -> prints an interpreter path, or nothing
  local v=$1 p ver
  p=$(command -v "python$v" 2>/dev/null) && is_version "$p" "$v" && { echo "$p"; return; }
  if command -v pyenv >/dev/null 2>&1; then  # pyenv shims answer only for the active version; ask pyenv directly
    for ver in $(pyenv versions --bare 2>/dev/null | grep -E "^${v//./\\.}(\\.[0-9]+)?$" | sort -V -r); do
      p=$(PYENV_VERSION=$ver pyenv which "python$v" 2>/dev/null) && is_version "$p" "$v" && { echo "$p"; return; }
    done
  fi
}

pip_quiet() {  # pip without the noise of unreachable extra indexes; keeps pip's exit status
  "$@" 2>&1 | grep -v -e "^WARNING: Location 'file:" -e "is neither a file nor a directory" ; return "${PIPESTATUS[0]}"
}

setup_env() {  # $1 = version, $2 = venv dir
  local v=$1 venv=$2 py
  py=$(find_python "$v")
  if [ -z "$py" ]; then
    echo "ERROR: Python $v was not found (tried python$v on PATH and pyenv)." >&2
    echo "       Install it (e.g. 'pyenv install $v'), or run only the others: CLINKD_PYTHONS=\"${PYTHONS/$v/}\" bash tests/run_all.sh" >&2
    return 3
  fi
  if [ ! -x "$venv/bin/python" ]; then
    echo "== creating $venv with $py"
    "$py" -m venv "$venv" || return 1
  fi
  pip_quiet "$venv/bin/python" -m pip install -q -U pip || return 1
  if [ "$v" = "3.11" ]; then
    # torch first and pinned: the CPU wheel for 3.11 lies on local disk; anything unpinned would pull CUDA.
    pip_quiet "$venv/bin/python" -m pip install -q "torch==2.13.0" || return 1
  fi
  pip_quiet "$venv/bin/python" -m pip install -q -e ".[cpu,test]" || return 1
}

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
