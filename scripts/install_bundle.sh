#!/usr/bin/env bash
# Install a bundle made by scripts/bundle.py, with no package index.
#   bash scripts/install_bundle.sh BUNDLE --target DIR [--python PY]   then: export PYTHONPATH=DIR
#   bash scripts/install_bundle.sh BUNDLE --venv DIR [--python PY]     a venv that also sees PY's packages
# The bundle leaves out what the target already has, so wheels go in with --no-deps; a check at
# the end imports nothing but compares every bundled distribution's installed version.
set -euo pipefail
usage() { sed -n 2,6p "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
bundle=${1:-}
[ -d "$bundle/wheels" ] || usage
shift
mode="" dest="" python=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case $1 in
    --target | --venv) mode=${1#--}; dest=${2:?}; shift 2 ;;
    --python) python=${2:?}; shift 2 ;;
    *) usage ;;
  esac
done
[ -n "$mode" ] || usage
flags=(-q --no-index --no-deps --no-cache-dir --disable-pip-version-check)

if [ "$mode" = venv ]; then
  if [ ! -x "$dest/bin/python" ]; then
    "$python" -m venv "$dest"
    # --system-site-packages would show the base interpreter's packages, not those of a venv that
    # PY may itself be (torch lives in one on the GPU image): point a .pth at PY's own.
    purelib=$("$dest/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "$python" -c 'import site; print("\n".join(site.getsitepackages()))' >"$purelib/_base_packages.pth"
  fi
  "$dest/bin/python" -m pip install "${flags[@]}" "$bundle"/wheels/*.whl
  run=("$dest/bin/python")
else
  "$python" -m pip install "${flags[@]}" --no-compile --upgrade --target "$dest" "$bundle"/wheels/*.whl
  run=(env "PYTHONPATH=$(cd "$dest" && pwd)${PYTHONPATH:+:$PYTHONPATH}" "$python")
fi

"${run[@]}" - "$bundle/requirements.txt" <<'EOF'
import importlib.metadata as md, sys
bad = []
for line in open(sys.argv[1]):
    name, _, version = line.strip().partition("==")
    try:
        got = md.version(name)
    except md.PackageNotFoundError:
        got = None
    if got != version:
        bad.append(f"{name}: want {version}, found {got}")
print(f"install_bundle: {sum(1 for _ in open(sys.argv[1]))} distributions checked" + (":\n  " + "\n  ".join(bad) if bad else ", all in place"))
sys.exit(1 if bad else 0)
EOF
[ "$mode" = target ] && echo "install_bundle: export PYTHONPATH=$(cd "$dest" && pwd)\${PYTHONPATH:+:\$PYTHONPATH}"
exit 0
