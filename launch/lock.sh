#!/usr/bin/env bash
# Writes launch/constraints/py311.txt and py312.txt: every package, pinned, that the newest releases setup.cfg
# allows resolve to today, from a scratch environment per Python (as tests/run_all.sh and launch/demo.sh would
# build it). Those two commands then install exactly these versions, so a fresh machine gets what CI passed with.
#   bash launch/lock.sh            # both Pythons
#   bash launch/lock.sh 3.12       # one
# Then run the suite on the new lock (bash tests/run_all.sh) before committing it.
set -uo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for v in ${@:-3.11 3.12}; do
  venv="$scratch/py${v/./}"
  setup_env "$v" "$venv" newest || { echo "ERROR: Python $v: the environment did not build" >&2; exit 1; }
  out=$(constraints_file "$v")
  mkdir -p "$(dirname "$out")"
  {
    echo "# Python $v: the versions tests/run_all.sh and launch/demo.sh install (pip -c). Written by"
    echo "# 'bash launch/lock.sh $v' on $(date -u +%Y-%m-%d) from setup.cfg's ranges; do not edit by hand."
    "$venv/bin/python" -m pip freeze --exclude-editable --all | grep -v -E '^(pip|setuptools|wheel)==' | LC_ALL=C sort -f
  } > "$out.tmp" && mv "$out.tmp" "$out"
  echo "== $out: $(grep -c '==' "$out") packages, $(grep -i -E '^(jax|jaxlib|flax)==' "$out" | tr '\n' ' ')"
done
