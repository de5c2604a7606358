#!/usr/bin/env bash
# One device call of the 0.33 hunt (docs/gpu_runs/2026-12-07b): gather the carried chunks of the full
# vLLM 0.33.0 bundle (.lease/c33h: vLLM, torch 2.14 stack, Ray, Hydra, W&B), install it once into a
# venv over the image's packages, then run or resume `hunt=gpu` on /tmp/hunt_gpu33 until BUDGET s of
# hunt clock (summed over calls) or the call's deadline; the hunt dir and logs go to $OUT.
#   bash .lease/gpu/hunt33.sh BUDGET [EXTRA_OVERRIDES...]
# Until all 25 chunks (23 of .lease/c33h, 2 of .lease/c33t) are in /tmp/chunks33h a call only moves
# the chunks it carried there and exits: a partial stream must never reach the install.
set -uo pipefail
deadline=$(( $(date +%s) + ${DRIVE_S:-570} ))
chunks=/tmp/chunks33h bundle=/tmp/b33h venv=/tmp/v33h py=/tmp/v33h/bin/python hunt=/tmp/hunt_gpu33
out=${OUT:-/tmp/out}
mkdir -p "$chunks" "$out"
mv .lease/c33h/c*/bundle.tar.part* .lease/c33t/c*/tail.tar.part* "$chunks"/ 2>/dev/null
n=$(ls "$chunks" | wc -l)
echo "chunks: $n of 25"
if [ ! -f "$venv/.installed" ] && [ "$n" -lt 25 ]; then echo "carry only: $(( 25 - n )) chunk(s) to come"; exit 0; fi
budget=${1:?hunt budget in s}; shift
t0=$(date +%s)
if [ ! -f "$venv/.installed" ]; then
  nvidia-smi >"$out/nvidia-smi.txt" 2>&1
  # The xz stream (.lease/c33h) was cut inside the torch wheel (a lost packing stage): its first
  # 536022528 bytes come from the stream, the rest and 15 wheels after it from .lease/c33t.
  mkdir -p "$bundle"
  cat "$chunks"/bundle.tar.part* | xz -dc -T0 2>/dev/null | tar -C "$bundle" --strip-components=1 -xf - 2>/dev/null
  cat "$chunks"/tail.tar.part* | tar -C /tmp -xf - || exit 1
  torch="$bundle/wheels/torch-2.14.0-cp312-cp312-manylinux_2_28_x86_64.whl"
  truncate -s 536022528 "$torch" && cat /tmp/tail33/torch.tail >>"$torch" && cp /tmp/tail33/wheels/*.whl "$bundle/wheels/"
  [ "$(sha256sum "$torch" | cut -d' ' -f1)" = "$(cat /tmp/tail33/torch.sha256)" ] || { echo "torch wheel: bad sha256"; exit 1; }
  echo "bundle: $(ls "$bundle/wheels" | wc -l) wheels"
  python3 -m venv --without-pip "$venv"
  site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  python3 -c 'import site; print("\n".join(site.getsitepackages()))' >"$site/_base_packages.pth"
  bash scripts/install_bundle.sh "$bundle" --target "$site" >/tmp/install33h.log 2>&1 && touch "$venv/.installed"
  tail -3 /tmp/install33h.log; cp /tmp/install33h.log "$out/"
  echo "install: $(( $(date +%s) - t0 )) s"
  [ -f "$venv/.installed" ] || { echo "install failed"; exit 1; }
  rm -rf "$chunks" "$bundle" /tmp/tail33
fi
export ROLLOUT_LAB_CACHE=/tmp/rlcache HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONPATH=$PWD
"$py" -c "import torch, vllm, ray, hydra; print('vllm', vllm.__version__, 'torch', torch.__version__, 'ray', ray.__version__, torch.cuda.get_device_name())" 2>&1 | tail -2
left=$(( deadline - $(date +%s) - 25 ))
floor=""
if [ -d .lease/shift_tree ] && [ ! -f /tmp/shift_floor.started ]; then
  # Issue 31's smallest detectable shift on this GPU, beside the hunt (its own Ray, a tenth of the GPU per actor).
  touch /tmp/shift_floor.started
  ( cd .lease/shift_tree && PYTHONPATH=$PWD timeout -s INT -k 20 $(( left - 20 )) "$py" scripts/shift_floor.py \
      --out "$out/shift_floor.json" --budget-s $(( left - 120 < 330 ? left - 120 : 330 )) \
      ray.sampler_num_gpus=0.1 ray.trainer_num_gpus=0.1 engine.gpu_memory_utilization=0.1 \
      engine.kv_cache_memory_bytes=2000000000 >/tmp/shift_floor.log 2>&1
    echo "shift_floor exit $?" >>/tmp/shift_floor.log
    tar -czf "$out/shift_floor_runs.tgz" runs /tmp/shift_floor.log 2>/dev/null ) &
  floor=$!
fi
echo "hunt: $left s of this call, budget $budget s"
timeout -s INT -k 20 "$left" "$py" -m rollout_lab.hunt hunt=gpu hunt.known_repros=null \
  hunt.budget_s="$budget" hydra.run.dir="$hunt" "$@" >>/tmp/hunt33.log 2>&1
echo "hunt exit $?"
tail -40 /tmp/hunt33.log
[ -n "$floor" ] && { wait "$floor"; tail -25 /tmp/shift_floor.log; cp /tmp/shift_floor.log "$out/"; }
# Every call brings the hunt dir back, so a lost machine still leaves the last call's copy here
# (a file over 16 MiB would not come back: then without the per-group event lines).
gzip -c /tmp/hunt33.log >"$out/hunt33.log.gz"
cp "$hunt"/HUNT_REPORT.md "$hunt"/findings.csv "$out/" 2>/dev/null
tar -C /tmp -czf "$out/hunt_gpu33.tgz" hunt_gpu33
[ "$(stat -c %s "$out/hunt_gpu33.tgz")" -lt 16000000 ] || tar -C /tmp -czf "$out/hunt_gpu33.tgz" --exclude=lines hunt_gpu33
ls -la "$out"
