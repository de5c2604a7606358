#!/usr/bin/env bash
# The lab's GPU checks on a machine where rollout_lab and CUDA vLLM are installed (README, "GPU"):
#   calibrate  clean float32 + bfloat16 runs -> this device's spike thresholds
#   fault      a planted fault under memory pressure (stale_state + kv_tight) must be flagged
#   clean      five clean float32 runs under that calibration must flag nothing
#   sweep      the 4-point cache_size sweep with index_overflow
#   hunt       a short hunt (hunt=smoke) with stale_state planted
#   hunt_default  the default hunt space, no planted fault, GPU_CHECK_DEFAULT_HUNT_S (300) seconds;
#              prints every crash, hang and harness error with its message line (from hunt.db)
#   architectures  the default job (float32, real weight sync, workload.reward=even_tokens) on every tiny model of
#              rollout_lab.tiny_models.TINY_CONFIGS; one line per model: max |diff|, sync, clean or not,
#              or why it did not run (an architecture this vLLM cannot load is one line, not a stop)
#   localize   the localizer on a planted stale_state (kv_tight, float32) and its --no-fault control;
#              prints each first divergence and the seconds per token
#   repros     every repro/gpu_*/repro*.py in a fresh interpreter in an empty directory: its verdict line
#   faults_v2  the Mamba state faults on both CUDA model runners (v1: hybrids' default on 0.25; v2:
#              VLLM_USE_V2_MODEL_RUNNER=1) and index_overflow's remap on v2 (smollm2's default); one line
#              per run: FIRED (a spike fraction above 0) or NOT FIRED, with preemptions and max |diff|
#   multi_gpu  needs 2 GPUs, so only when named (docs/multi_gpu.md): llama-tiny with a TP=2 sampler (a
#              rank per GPU) and the trainer sharing GPU 0, 3 steps; the default job with
#              loop.num_workers=2 (a sampler per GPU); tests/integration/test_tp.py (a sync that
#              misses rank 1 must be a sync_mismatch); hunt=gpu for GPU_CHECK_MULTI_GPU_HUNT_S (300) s
# GPU_CHECK_ARGS: extra overrides for the architectures step (e.g. engine.enforce_eager=true: no
# CUDA-graph capture and compile per model, a minute less per engine start); GPU_CHECK_MODELS: its
# models, comma-separated (default: every tiny model); GPU_CHECK_REPROS: the repros step's scripts (a glob).
# Several jobs share one GPU at once (GPU_CHECK_PARALLEL, default 5): each takes a tenth of it
# and an explicit 2 GB KV cache, so engines starting together do not size themselves from one
# another's memory. Logs and a summary of every run go to GPU_CHECK_OUT (default gpu_check/).
#   bash scripts/gpu_check.sh [calibrate] [fault] [clean] [sweep] [hunt] [hunt_default] [architectures] [localize] [faults_v2] [repros] [multi_gpu]   (no argument: all but multi_gpu)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${GPU_CHECK_OUT:-gpu_check}
parallel=${GPU_CHECK_PARALLEL:-5}
py=${PYTHON:-python3}
case $py in */*) py=$(cd "$(dirname "$py")" && pwd)/$(basename "$py") ;; esac  # a path that works from any directory
mkdir -p "$out"
t0=$(date +%s)
say() { echo "[gpu_check +$(($(date +%s) - t0))s] $*"; }
share=(ray.sampler_num_gpus=0.1 ray.trainer_num_gpus=0.1 engine.gpu_memory_utilization=0.1
       "hydra.launcher.max_parallel_jobs=$parallel")
job() {  # job NAME ARGS...: one logged command, its summary lines echoed
  local name=$1; shift
  say "$name: $*"
  "$@" >"$out/$name.log" 2>&1
  local rc=$?
  say "$name: exit $rc"
  grep -E "^(status|tokens|reward mean|spike threshold|verdict|run dir|findings?|hunt)|Traceback|Error:" "$out/$name.log" | tail -25
  return $rc
}
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(calibrate fault clean sweep hunt hunt_default architectures localize faults_v2 repros)
say "device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo none)"
for step in "${steps[@]}"; do
  case $step in
    calibrate) job calibrate "$py" -m rollout_lab.calibrate --runs 1 --dtypes float32 bfloat16 ;;
    fault) job fault "$py" -m rollout_lab +pressure=kv_tight fault=stale_state run_name=gpu-stale_state ;;
    clean) job clean "$py" -m rollout_lab -m engine.seed=1,2,3,4,5 run_name=gpu-clean "${share[@]}" engine.kv_cache_memory_bytes=2000000000 ;;
    sweep) job sweep "$py" -m rollout_lab +sweep=cache_size fault=index_overflow "${share[@]}" ;;
    hunt) job hunt "$py" -m rollout_lab.hunt hunt=smoke fault=stale_state hunt.budget_s=${GPU_CHECK_HUNT_S:-240} hunt.minimize=false hydra.run.dir="$out/hunt" ;;
    hunt_default)
      # Each engine claims a quarter of the GPU at start, so other checks can share it.
      job hunt_default "$py" -m rollout_lab.hunt hunt.budget_s=${GPU_CHECK_DEFAULT_HUNT_S:-300} hunt.minimize=false \
        "+hunt.space.engine.gpu_memory_utilization=[0.25]" hydra.run.dir="$out/hunt_default"
      "$py" - "$out/hunt_default" <<'PY'
import collections, sys
from pathlib import Path
from rollout_lab.hunt.store import Store
trials = Store(Path(sys.argv[1]) / "hunt.db").trials()
print(f"hunt_default: {len(trials)} trials: {dict(collections.Counter(t.status for t in trials))}")
for t in trials:
    if t.status in ("crash", "hang", "died", "harness_error"):
        print(f"  {t.status} {t.signature}: {t.result.crash.message if t.result.crash else t.result.phase}")
PY
      ;;
    repros)
      # Every GPU repro in repro/ (repro.py and any repro_*.py) as a maintainer runs it: in an empty
      # directory, nothing of rollout_lab importable; the SmolLM2 ones get the lab's copy (--model).
      smollm2=$("$py" -c "from rollout_lab.models import resolve_model; print(resolve_model('smollm2'))")
      # PYTHONPATH keeps a --target install of vLLM (scripts/gpu_lease.sh), not the checkout.
      keep=$(tr ':' '\n' <<<"${PYTHONPATH:-}" | while read -r d; do [ -n "$d" ] && [ ! -d "$d/rollout_lab" ] && echo "$d"; done | paste -sd:)
      for script in ${GPU_CHECK_REPROS:-repro/gpu_*/repro*.py}; do
        args=(); grep -q "HuggingFaceTB/SmolLM2" "$script" && args=(--model "$smollm2")
        name=$(basename "$(dirname "$script")")_$(basename "$script" .py)
        dir=$(mktemp -d) path=$PWD/$script
        ( cd "$dir" && PYTHONPATH="$keep" timeout "${GPU_CHECK_REPRO_S:-400}" "$py" -s "$path" "${args[@]}" ) \
          >"$out/repro_$name.log" 2>&1
        say "repro $name: exit $? $(grep -E "^(REPRODUCED|NOT REPRODUCED|CANNOT RUN)" "$out/repro_$name.log" | tail -1)"
      done ;;
    localize)
      # The localizer on a planted stale_state under kv_tight, then its clean control (--no-fault).
      job localize_run "$py" -m rollout_lab +pressure=kv_tight fault=stale_state engine.dtype=float32 loop.steps=1 \
        run_name=gpu-localize hydra.run.dir="$out/localize_run"
      job localize "$py" -m rollout_lab.localize "$out/localize_run" --tokens 3
      job localize_clean "$py" -m rollout_lab.localize "$out/localize_run" --tokens 3 --no-fault
      grep -h "^first divergence\|^no divergence\|^localized\|^warning" "$out"/localize.log "$out"/localize_clean.log ;;
    faults_v2)
      # name, runner (VLLM_USE_V2_MODEL_RUNNER; unset: vLLM's choice), overrides. One eager step each.
      runs=("foreign_hybrid_v1|0|model=hybrid-tiny +pressure=state_tight fault=foreign_ssm_state"
            "foreign_hybrid_v2|1|model=hybrid-tiny +pressure=state_tight fault=foreign_ssm_state"
            "overflow_mamba2_v1|0|model=mamba2-tiny +pressure=high_ids fault=index_overflow fault.params.threshold=160"
            "overflow_mamba2_v2|1|model=mamba2-tiny +pressure=high_ids fault=index_overflow fault.params.threshold=160"
            "overflow_smollm2_default||model=smollm2 +pressure=high_ids fault=index_overflow fault.params.threshold=160")
      for run in "${runs[@]}"; do
        IFS='|' read -r name runner overrides <<<"$run"
        # shellcheck disable=SC2086
        job "faults_v2_$name" env ${runner:+VLLM_USE_V2_MODEL_RUNNER=$runner} "$py" -m rollout_lab $overrides \
          engine.dtype=float32 engine.enforce_eager=true engine.gpu_memory_utilization=0.1 loop.steps=1 \
          run_name="gpu-$name" hydra.run.dir="$out/faults_v2_$name"
      done
      "$py" - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for job in sorted(out.glob("faults_v2_*/summary.json")):
    s = json.loads(job.read_text())
    # The runner the engine's worker reported (rollout_lab.engine.execution_facts); none if it never started.
    runner = s["environment"].get("model_runner_label") or "unknown"
    fired = s["status"] == "ok" and s["spike_fraction"] > 0
    print(f"{job.parent.name[len('faults_v2_'):]:24s} runner {runner} {'FIRED' if fired else 'NOT FIRED'} status={s['status']} "
          f"preemptions={s['preemptions']} max|diff|={s['abs_diff_max']:.3g} spike fraction={s['spike_fraction']:.3f}")
PY
      ;;
    multi_gpu)
      # smollm2's 9 attention heads do not split over 2 ranks: the TP job runs llama-tiny (4 heads).
      job multi_gpu_tp2 "$py" -m rollout_lab model=llama-tiny +engine.args.tensor_parallel_size=2 run_name=gpu-tp2 \
        hydra.run.dir="$out/multi_gpu_tp2"
      job multi_gpu_workers2 "$py" -m rollout_lab loop.num_workers=2 run_name=gpu-workers2 hydra.run.dir="$out/multi_gpu_workers2"
      grep -h -A4 "^placement" "$out"/multi_gpu_tp2.log "$out"/multi_gpu_workers2.log
      job multi_gpu_tests "$py" -m pytest -q -m integration tests/integration/test_tp.py
      job multi_gpu_hunt "$py" -m rollout_lab.hunt hunt=gpu "hunt.space.models=[llama-tiny,hybrid-tiny]" \
        hunt.budget_s=${GPU_CHECK_MULTI_GPU_HUNT_S:-300} hunt.minimize=false hydra.run.dir="$out/multi_gpu_hunt"
      "$py" - "$out/multi_gpu_hunt" <<'PY'
import collections, sys
from pathlib import Path
from rollout_lab.hunt.store import Store
trials = Store(Path(sys.argv[1]) / "hunt.db").trials()
by_tp = collections.defaultdict(collections.Counter)
for t in trials:
    by_tp[t.engine.get("engine.tensor_parallel_size")][t.status] += 1
print(f"multi_gpu_hunt: {len(trials)} trials; status by tensor_parallel_size: {({k: dict(v) for k, v in by_tp.items()})}")
PY
      ;;
    architectures)
      tiny=${GPU_CHECK_MODELS:-$("$py" -c "from rollout_lab.tiny_models import TINY_CONFIGS; print(','.join(TINY_CONFIGS))")}
      # even_tokens: a random tiny model earns no math reward, so its policy (and the synced weights) would not move.
      job architectures "$py" -m rollout_lab -m "model=$tiny" engine.dtype=float32 workload.reward=even_tokens run_name=gpu-arch "${share[@]}" \
        engine.kv_cache_memory_bytes=2000000000 hydra.sweep.dir="$out/architectures" ${GPU_CHECK_ARGS:-}
      "$py" - "$out/architectures" <<'PY'
import json, sys
from pathlib import Path
from omegaconf import OmegaConf
# One line per job dir: a job vLLM could not start is a crash or a failure.txt, never a stop.
for job in sorted(p for p in Path(sys.argv[1]).iterdir() if (p / ".hydra").is_dir()):
    model = next(o.split("=", 1)[1] for o in OmegaConf.load(job / ".hydra" / "overrides.yaml") if o.startswith("model="))
    if not (job / "summary.json").exists():
        failure = job / "failure.txt"
        print(f"{model:16s} did not run: {failure.read_text().strip() if failure.exists() else 'no summary.json'}"[:300])
        continue
    s = json.loads((job / "summary.json").read_text())
    if s["status"] == "crash":
        print(f"{model:16s} crash {s['crash']['key']}: {s['crash']['message']}"[:300])
        continue
    clean = s["status"] == "ok" and s["abs_diff_max"] <= s["spike_threshold"]
    sync, moved = (f"{v:.3g}" if v is not None else "none" for v in (s["weight_sync_max_diff"], s["policy_change"]))
    print(f"{model:16s} {'clean' if clean else 'NOT CLEAN'} status={s['status']} max|diff|={s['abs_diff_max']:.3g} "
          f"(threshold {s['spike_threshold']:g}) sync={sync} policy_change={moved} "
          f"sync_exercised={s.get('weight_sync_exercised')} tokens={s['num_tokens']} {s['seconds']:.0f}s")
PY
      ;;
    *) echo "unknown step $step (calibrate fault clean sweep hunt hunt_default architectures localize faults_v2 repros multi_gpu)" >&2; exit 2 ;;
  esac
done
"$py" - "$out" <<'EOF'
import json, sys
from pathlib import Path
rows = []
for summary in sorted(Path(".").glob("runs/**/summary.json")) + sorted(Path(".").glob("multirun/**/summary.json")):
    s = json.loads(summary.read_text())
    rows.append({k: s.get(k) for k in ("run_id", "status", "num_tokens", "abs_diff_max", "spike_fraction",
                                       "spike_threshold", "spike_threshold_source", "preemptions",
                                       "weight_sync_max_diff", "engine_start_seconds", "seconds")} | {"dir": str(summary.parent)})
Path(sys.argv[1], "runs.json").write_text(json.dumps(rows, indent=1, default=str))
for r in rows:
    print(json.dumps(r, default=str))
EOF
say done
