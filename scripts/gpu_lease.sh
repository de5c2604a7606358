#!/usr/bin/env bash
# On a machine lent through the workplace's device tool (no index, bare at every lease): gather the
# bundle chunks carried one per call (scripts/device_carry.sh pack), install them once, and run
# commands with rollout_lab importable from this checkout; what they write under RESULTS is
# packed into $OUT/results.tgz (the tool brings back a few files, not a tree).
#   bash scripts/gpu_lease.sh keep .whl/c03               # a carry call: keep this chunk for later
#   bash scripts/gpu_lease.sh run 'CMD; CMD ...'          # install if needed, then run the commands
set -uo pipefail
cd "$(dirname "$0")/.."
chunks=/tmp/rollout_lab-chunks site=/tmp/rollout_lab-site
export RESULTS=/tmp/rollout_lab-results
mkdir -p "$chunks" "$RESULTS"
case ${1:-} in
  keep) cp "${2:?chunk folder}"/* "$chunks"/ && ls "$chunks" ;;
  run)
    if [ ! -f "$site/.installed" ]; then
      bash scripts/device_carry.sh unpack "$chunks" /tmp/rollout_lab-bundle &&
        bash scripts/install_bundle.sh /tmp/rollout_lab-bundle --target "$site" >"$RESULTS/install.log" 2>&1 &&
        touch "$site/.installed" || { tail -20 "$RESULTS/install.log"; exit 1; }
    fi
    export PYTHONPATH="$site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-WARNING}
    python3 -m rollout_lab.models prepare >"$RESULTS/models.log" 2>&1 || tail -5 "$RESULTS/models.log"
    bash -c "${2:?commands}"
    rc=$?
    tar -C "$RESULTS" -czf "${OUT:-/tmp}/results.tgz" . && ls -la "${OUT:-/tmp}/results.tgz"
    exit $rc ;;
  *) sed -n 2,7p "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
