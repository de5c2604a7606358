#!/usr/bin/env bash
# One device call of 2026-12-07 (docs/gpu_runs/2026-12-07): gather the carried chunks of a vLLM
# bundle, install it into a venv over the image's packages (its site-packages first), prepare
# rollout_lab's SmolLM2 copy, and run every GPU repro at once (scripts/gpu_repros.sh); the logs go
# to $OUT/results_REL.tgz and the verdicts to $OUT/verdicts_REL.tsv.
#   bash .lease/gpu/drive.sh REL     # REL: 33 (vLLM 0.33.0, carried in .lease/c33) or 25 (.lease/c25)
# It ran from .lease/gpu/ (this file, scripts/gpu_repros.sh and the repro/gpu_* scripts of this branch).
# Fixed after the run: a bare `wait` also waited for the `tee` of the log (bash waits for process
# substitutions), which waits for this script's own output to end, so both calls hung after their
# last verdict until the 600 s limit and the results never reached $OUT; it now waits for the two jobs.
set -uo pipefail
rel=${1:?33 or 25}
here=$(cd "$(dirname "$0")" && pwd)
deadline=$(( $(date +%s) + ${DRIVE_S:-565} ))
res=/tmp/res$rel chunks=/tmp/chunks$rel bundle=/tmp/b$rel venv=/tmp/v$rel py=/tmp/v$rel/bin/python
mkdir -p "$res" "$chunks" "${OUT:-/tmp/out}"
exec > >(tee "$res/drive.log") 2>&1
mv .lease/c$rel/c*/bundle.tar.part* "$chunks"/ 2>/dev/null
echo "chunks: $(ls "$chunks" | wc -l)"
{ nvidia-smi; python3 -m pip list 2>/dev/null; } >"$res/device.txt"
t0=$(date +%s)
if [ ! -f "$venv/.installed" ]; then
  bash scripts/device_carry.sh unpack "$chunks" "$bundle" || exit 1
  python3 -m venv --without-pip "$venv"
  site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # The image's packages after the bundle's: its torch stack where the bundle has none.
  python3 -c 'import site; print("\n".join(site.getsitepackages()))' >"$site/_base_packages.pth"
  bash scripts/install_bundle.sh "$bundle" --target "$site" >"$res/install.log" 2>&1 && touch "$venv/.installed"
  tail -2 "$res/install.log"
fi
echo "install: $(( $(date +%s) - t0 )) s"
"$py" -I -c "import torch, triton, transformers, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" 2>&1 | tail -2
left=$(( deadline - $(date +%s) - 10 ))
GPU_REPROS_TIMEOUT_S=$(( left < 420 ? left : 420 )) bash "$here/scripts/gpu_repros.sh" "$py" "$res/repros" &
jobs_=($!)
smollm2=/tmp/rlcache/models/smollm2
( [ -f "$smollm2/.prepared" ] || ROLLOUT_LAB_CACHE=/tmp/rlcache "$py" -m rollout_lab.models prepare smollm2 >"$res/smollm2.log" 2>&1
  echo "smollm2: $(( $(date +%s) - t0 )) s after the install began"; left=$(( deadline - $(date +%s) - 10 ))
  GPU_REPROS_TIMEOUT_S=$(( left < 420 ? left : 420 )) GPU_REPROS_ONLY='^batch_invariance_(large_batch|large_batch_fp32|v2_runner)$' \
    bash "$here/scripts/gpu_repros.sh" "$py" "$res/repros" "$smollm2" ) &
jobs_+=($!)
wait "${jobs_[@]}"
echo "all: $(( $(date +%s) - t0 )) s"
sort "$res/repros/verdicts.tsv" | tee "${OUT:-/tmp/out}/verdicts_$rel.tsv"
tar -C "$res" -czf "${OUT:-/tmp/out}/results_$rel.tgz" .
