#!/usr/bin/env bash
# The lab against other vLLM releases (issue 18), each in its own cached venv with rollout_lab
# installed editable from this checkout (rollout_lab/releases.py, the bisect's machinery):
#   unit     the unit tests (tests/unit)
#   job      the default job for one step: python -m rollout_lab loop.steps=1
#   fault    a planted fault seen: fault=logit_noise loop.steps=1 must flag tokens
#   hunt     the default hunt space for COMPAT_HUNT_S (120) seconds, no minimization
# and prints one table. A release that cannot be installed is a row, never the end of the check.
#   bash scripts/compat_check.sh 0.27.1 0.29.0 0.31.0 0.32.0
# Each step gets COMPAT_STEP_TIMEOUT_S (1200) seconds. Logs and run dirs: COMPAT_OUT (default
# $ROLLOUT_LAB_CACHE/compat_check/<date-time>)/<release>/. Given an existing COMPAT_OUT it resumes:
# a step with an exit code there is not run again (delete <release>/<step>.rc to redo it).
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: bash scripts/compat_check.sh RELEASE... (e.g. 0.29.0 0.32.0)" >&2; exit 2; }
cache=${ROLLOUT_LAB_CACHE:-$HOME/.cache/rollout_lab}
out=${COMPAT_OUT:-$cache/compat_check/$(date +%Y%m%d-%H%M%S)}
hunt_s=${COMPAT_HUNT_S:-120}
step_timeout=${COMPAT_STEP_TIMEOUT_S:-1200}  # a step still running then is killed (exit 124)
host_py=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1
mkdir -p "$out"
t0=$(date +%s)
say() { echo "[compat_check +$(($(date +%s) - t0))s] $*"; }

for release in "$@"; do
  dir="$out/$release"
  mkdir -p "$dir"
  say "$release: venv (cached, or installing: minutes)"
  if ! py=$("$host_py" -m rollout_lab.releases python "$release" --lab 2>"$dir/install.err"); then
    say "$release: $(cat "$dir/install.err")"
    continue
  fi
  step() {  # step NAME COMMAND...: one logged command; its exit code goes to NAME.rc
    local name=$1; shift
    if [ -f "$dir/$name.rc" ]; then say "$release $name: done before (exit $(cat "$dir/$name.rc"))"; return; fi
    say "$release $name: $*"
    timeout -k 30 "$step_timeout" "$@" >"$dir/$name.log" 2>&1
    echo $? >"$dir/$name.rc"
    say "$release $name: exit $(cat "$dir/$name.rc")"
  }
  step unit "$py" -m pytest -q -p no:cacheprovider tests/unit
  step job "$py" -m rollout_lab loop.steps=1 hydra.run.dir="$dir/job"
  step fault "$py" -m rollout_lab fault=logit_noise loop.steps=1 hydra.run.dir="$dir/fault"
  step hunt "$py" -m rollout_lab.hunt hunt.budget_s="$hunt_s" hunt.minimize=false hydra.run.dir="$dir/hunt"
done

"$host_py" - "$out" "$@" <<'PY'
import collections, json, re, sqlite3, sys
from pathlib import Path

out, releases = Path(sys.argv[1]), sys.argv[2:]

def summary(run_dir):
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None

def last_line(log, pattern=r"Error|error"):
    lines = [l.strip() for l in log.read_text(errors="replace").splitlines() if re.search(pattern, l)] if log.is_file() else []
    return lines[-1][:120] if lines else "no output"

def crash_of(s):
    crash = s.get("crash") or {}
    return f"; {crash.get('key') or crash.get('exception_type')}: {(crash.get('message') or '')[:90]}" if crash else ""

def cell(text):
    return str(text).replace("|", "\\|")

print("\n| release | torch | transformers | unit tests | default job, 1 step | logit_noise seen | hunt (default space) |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for release in releases:
    d = out / release
    if (d / "install.err").is_file() and (d / "install.err").read_text().strip():
        print(f"| {release} | - | - | {cell((d / 'install.err').read_text().strip()[:300])} | | | |")
        continue
    versions = {}
    for run in ("job", "fault"):
        s = summary(d / run)
        if s and s.get("environment"):
            versions = s["environment"]
            break
    unit_log = (d / "unit.log").read_text(errors="replace") if (d / "unit.log").is_file() else ""
    unit = re.findall(r"^=*\s*((?:\d+ \w+(?:, )?)+) in [\d.]+s", unit_log, re.M)
    unit = unit[-1] if unit else f"exit {(d / 'unit.rc').read_text().strip()}: {last_line(d / 'unit.log')}"
    failed = sorted(set(re.findall(r"^FAILED (\S+)", unit_log, re.M)))
    if failed:
        unit += " (" + ", ".join(f.split("::")[-1] for f in failed[:4]) + (", ..." if len(failed) > 4 else "") + ")"
    job = summary(d / "job")
    job_cell = (f"{job['status']}: {job['num_tokens']} tokens, max {job['abs_diff_max']:.2g}, "
                f"sync {job.get('weight_sync_max_diff') or 0:.2g}, preemptions {job.get('preemptions')}{crash_of(job)}"
                if job else f"no summary: {last_line(d / 'job.log')}")
    fault = summary(d / "fault")
    if fault:
        seen = fault["spike_fraction"] > 0 or fault["status"] == "sync_mismatch"
        fault_cell = f"{'yes' if seen else 'NO'}: {fault['status']}, spike fraction {fault['spike_fraction']:.2f}, max {fault['abs_diff_max']:.2g}{crash_of(fault)}"
    else:
        fault_cell = f"no summary: {last_line(d / 'fault.log')}"
    db = d / "hunt" / "hunt.db"
    if db.is_file():
        sys.path.insert(0, ".")
        from rollout_lab.hunt.store import Store
        trials = Store(db).trials()
        counts = dict(collections.Counter(t.status for t in trials))
        errors = [t for t in trials if t.status == "harness_error"]
        hunt_cell = f"exit {(d / 'hunt.rc').read_text().strip()}, {len(trials)} trials {counts}"
        if errors and errors[0].result.crash:
            crash = errors[0].result.crash
            hunt_cell += f"; harness error: {crash.exception_type}: {crash.message}"
        crashes = sorted({t.result.crash.message[:80] for t in trials if t.status == "crash" and t.result.crash})
        if crashes:
            hunt_cell += "; crash messages: " + " / ".join(crashes)
    else:
        hunt_cell = f"no hunt.db: {last_line(d / 'hunt.log')}"
    print(f"| {release} | {versions.get('torch', '-')} | {versions.get('transformers', '-')} | {cell(unit)} | "
          f"{cell(job_cell)} | {cell(fault_cell)} | {cell(hunt_cell)} |")
print(f"\nlogs and run dirs: {out}")
PY
