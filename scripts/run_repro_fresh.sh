#!/bin/bash
# Run a repro.py the way a maintainer would and keep what it printed:
#   scripts/run_repro_fresh.sh repro/<name>/repro.py [OUT] [repro args...]
# `python -I repro.py` in a new empty directory, HOME an empty directory and ROLLOUT_LAB_CACHE hidden, no other
# environment but PATH. OUT (default repro/<name>/output.txt) gets the output; the last line printed is
# "exit N in S s". PYTHON overrides the interpreter (default: this checkout's .venv).
set -u
script=$(readlink -f "$1"); out=$(readlink -f "${2:-$(dirname "$1")/output.txt}"); shift; [ $# -gt 0 ] && shift
# Not readlink -f: a venv's python is a symlink to the base interpreter, which has none of its packages.
python=${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
dir=$(mktemp -d); home=$(mktemp -d)
cp "$script" "$dir/repro.py"
cd "$dir" || exit 2
start=$(date +%s)
env -i PATH=/usr/bin:/bin HOME="$home" ROLLOUT_LAB_CACHE=/nonexistent timeout 900 "$python" -I repro.py "$@" > "$out" 2>&1
rc=$?
cd / && rm -rf "$dir" "$home"
tail -1 "$out"
echo "exit $rc in $(( $(date +%s) - start )) s"
