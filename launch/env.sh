#!/usr/bin/env bash
# Shared set-up: find a Python of a given version and build/refresh its virtual environment in .venv/.
# Sourced by tests/run_all.sh (both environments) and launch/demo.sh (Python 3.11), which also take its
# process settings (GLIBC_TUNABLES below).

# glibc's malloc backs its large buffers with transparent huge pages (madvise). XLA:CPU allocates fresh
# buffers every step (a scan's stacked residuals, gradient accumulators), and faulting them in page by page is a
# visible share of a CPU train step (bench/history.md). Unknown to other C libraries: ignored.
case ":${GLIBC_TUNABLES:-}:" in
  *:glibc.malloc.hugetlb=*) ;;
  *) export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1" ;;
esac

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

constraints_file() {  # $1 = 3.11 | 3.12 -> the versions CI passed with on that Python (written by launch/lock.sh)
  echo "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/constraints/py${1/./}.txt"
}

setup_env() {  # $1 = version, $2 = venv dir, $3 = locked (default: the constraints file's versions) | newest
  local v=$1 venv=$2 mode=${3:-locked} py extras pins
  py=$(find_python "$v")
  if [ -z "$py" ]; then
    echo "ERROR: Python $v was not found (tried python$v on PATH and pyenv)." >&2
    echo "       Install it (e.g. 'pyenv install $v'). To run the tests in one environment only:" >&2
    echo "       CLINKD_PYTHONS=3.11 bash tests/run_all.sh   (or 3.12)" >&2
    return 3
  fi
  if [ ! -x "$venv/bin/python" ]; then
    echo "== creating $venv with $py"
    "$py" -m venv "$venv" || return 1
  fi
  pip_quiet "$venv/bin/python" -m pip install -q -U pip || return 1
  if [ "$mode" = locked ]; then
    # what was tested: every package at the version in the constraints file (a newer release upstream changes
    # nothing here until launch/lock.sh writes it and the suite passes with it)
    pins=(-c "$(constraints_file "$v")")
    [ -f "${pins[1]}" ] || { echo "ERROR: ${pins[1]} is missing (bash launch/lock.sh $v writes it)" >&2; return 1; }
  else
    pins=(-U --upgrade-strategy eager)  # the newest releases setup.cfg allows, as a TPU VM or Colab gets them
  fi
  if [ "$v" = "3.11" ]; then
    # torch first and pinned: the CPU wheel for 3.11 lies on local disk; anything unpinned would pull CUDA.
    pip_quiet "$venv/bin/python" -m pip install -q "torch==2.13.0" || return 1
  fi
  # 3.12: libtpu (clinkd_jax.aot), gradio (clinkd_jax.serve) and Playwright (its browser test)
  # 3.11: TRL (a live reference; it needs torch, held at the pinned CPU wheel in the same install)
  if [ "$v" = "3.11" ]; then extras="cpu,test,reference"; else extras="cpu,test,tpu,serve,browser"; fi
  local held=()
  [ "$v" = "3.11" ] && held=("torch==2.13.0")
  pip_quiet "$venv/bin/python" -m pip install -q "${pins[@]}" -e ".[$extras]" "${held[@]}" || return 1
}
