"""Runs and seconds to minimize each planted fault from a default-size run, fresh-process confirmation included.

    python scripts/bench_minimize.py [fault ...] [--out DIR] [--reuse-runs]

For each fault: `python -m rollout_lab fault=<name> loop.steps=1` (stale_state with +pressure=kv_tight;
--reuse-runs keeps a run dir already under --out), then `python -m rollout_lab.minimize <run dir>` with
its defaults (verification on), from scratch (an earlier trial log is removed). Prints one row per
fault: runs, minimization seconds (trials), wall seconds (the minimizer's whole command, its fresh-process
confirmation and knob flips included), the emitted repro.py's budget lines and its fresh-process verdict.
The target is at most 40 runs each.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAULTS = {
    "index_overflow": [],
    "stale_state": ["+pressure=kv_tight"],
    "engine_crash": [],
    "logit_noise": [],
}
TARGET_RUNS = 40


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("faults", nargs="*", default=list(FAULTS), help=f"default: {' '.join(FAULTS)}")
    parser.add_argument("--out", type=Path, default=Path("bench_minimize"), help="run dirs and repros go here")
    parser.add_argument("--reuse-runs", action="store_true", help="minimize a fault's run dir already under --out instead of a new run")
    args = parser.parse_args()
    unknown = [f for f in args.faults if f not in FAULTS]
    if unknown:
        parser.error(f"unknown fault(s) {', '.join(unknown)}; choose from {', '.join(FAULTS)}")
    from rollout_lab.minimize.script import budget_lines

    out = args.out.resolve()
    env = os.environ | {"HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "ERROR"}
    rows = []
    for fault in args.faults:
        run_dir = out / "runs" / fault
        if not (args.reuse_runs and (run_dir / "summary.json").is_file()):
            subprocess.run([sys.executable, "-m", "rollout_lab", f"fault={fault}", "loop.steps=1", *FAULTS[fault],
                            f"hydra.run.dir={run_dir}"], cwd=REPO, env=env, check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        # The minimizer reads an earlier trial log back as cached runs: a bench starts from none.
        shutil.rmtree(out / "repro" / fault, ignore_errors=True)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "rollout_lab.minimize", str(run_dir), "--out", str(out / "repro"),
                               "--name", fault], cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        minimized = out / "repro" / fault / "minimized.json"
        if not minimized.is_file():
            tail = (done.stdout + done.stderr).strip().splitlines()
            rows.append((fault, "-", "-", f"{wall:.0f}", "-", f"minimizer exit {done.returncode}: {tail[-1] if tail else ''}"))
            continue
        info = json.loads(minimized.read_text())
        verdict = next((line.split(":", 1)[1].strip() for line in done.stdout.splitlines()
                        if line.startswith("repro.py in a fresh process:")), f"exit {done.returncode}")
        lines = budget_lines((out / "repro" / fault / "repro.py").read_text())
        rows.append((fault, str(info["runs"]), f"{info['seconds']:.0f}", f"{wall:.0f}", str(lines), verdict))
        print(" | ".join(rows[-1]), flush=True)
    print(f"\n| fault | runs (target <= {TARGET_RUNS}) | trial seconds | wall seconds | repro.py lines | fresh process |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0 if all(r[1] != "-" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
