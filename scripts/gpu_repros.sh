#!/usr/bin/env bash
# Every GPU repro in repro/ at once on one GPU, as a maintainer runs it: each in a fresh process
# (`python -I`: no PYTHONPATH, no user site, nothing of rollout_lab importable) in an empty
# directory, with HOME and rollout_lab's cache hidden. Each repro takes a bounded share of the GPU
# (gpu_memory_utilization 0.1 and an explicit cache size in its script), so they fit together.
#   bash scripts/gpu_repros.sh PYTHON OUTDIR [SMOLLM2_DIR]
# PYTHON: an interpreter with CUDA vLLM (e.g. a venv from scripts/install_bundle.sh --venv).
# SMOLLM2_DIR: rollout_lab's de-quantized SmolLM2 copy for the batch-invariance repros (the hub
# weights their scripts name cannot be fetched offline); without it they run only on `--model
# seeded` (SmolLM2-135M's architecture, seeded random weights built inline).
# OUTDIR gets one log per run and verdicts.tsv: name, exit code, seconds, verdict line.
# GPU_REPROS_TIMEOUT_S (default 420) bounds each run; GPU_REPROS_ONLY (a regex) picks runs by name.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${1:?python}; out=${2:?output dir}; smollm2=${3:-}
mkdir -p "$out"
# name|script|arguments
runs=(
  "mamba2_prefix_caching|repro/gpu_mamba2_prefix_caching/repro.py|"
  "mamba2_prefix_caching_reduced|repro/gpu_mamba2_prefix_caching/repro_reduced.py|"
  "granite_hybrid_layer_names|repro/gpu_granite_hybrid_layer_names/repro.py|"
  "mamba2_v2_runner_start|repro/gpu_mamba2_v2_runner_start/repro.py|"
  "mamba2_v2_runner_start_v1|repro/gpu_mamba2_v2_runner_start/repro.py|--runner v1"
  "batch_invariance_large_batch_seeded|repro/gpu_batch_invariance_large_batch/repro.py|--model seeded"
  "batch_invariance_v2_runner_seeded|repro/gpu_batch_invariance_v2_runner/repro.py|--model seeded"
)
if [ -n "$smollm2" ]; then
  runs+=("batch_invariance_large_batch|repro/gpu_batch_invariance_large_batch/repro.py|--model $smollm2"
         "batch_invariance_large_batch_fp32|repro/gpu_batch_invariance_large_batch/repro.py|--model $smollm2 --dtype float32"
         "batch_invariance_v2_runner|repro/gpu_batch_invariance_v2_runner/repro.py|--model $smollm2")
fi
one() {  # one NAME SCRIPT ARGS: a fresh process in an empty directory; a line in verdicts.tsv
  local name=$1 script=$PWD/$2 args=$3 dir t0 rc
  dir=$(mktemp -d) t0=$(date +%s)
  # shellcheck disable=SC2086
  ( cd "$dir" && HOME="$dir" ROLLOUT_LAB_CACHE=/nonexistent HF_HUB_OFFLINE=1 \
      timeout "${GPU_REPROS_TIMEOUT_S:-420}" "$py" -I "$script" $args ) >"$out/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" \
    "$(grep -E '^(REPRODUCED|NOT REPRODUCED|CANNOT RUN)' "$out/$name.log" | tail -1)" >>"$out/verdicts.tsv"
}
for run in "${runs[@]}"; do
  IFS='|' read -r name script args <<<"$run"
  [[ $name =~ ${GPU_REPROS_ONLY:-.} ]] && one "$name" "$script" "$args" &
done
wait
sort "$out/verdicts.tsv"
