"""`python -m rollout_lab.minimize <run_dir>`: shrink a failed run into repro/<name>/repro.py + REPORT.md.

Also takes a case file (a hunt finding's case.json, see predicate.load_case) in place of a run dir.
Besides repro.py and REPORT.md it writes minimized.json: the minimal case's engine arguments, the
knobs that stayed off their defaults (what switches the failure on), sizes before and after.

Exit status: 0 when the emitted repro.py reproduces in a fresh process (or --no-verify), 1 when it
does not, 2 when the run dir cannot be minimized (missing, did not fail, needs the trainer).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rollout_lab.minimize", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run dir whose run crashed or flagged tokens, or a case.json")
    parser.add_argument("--name", help="folder name under --out (default: <fault or failure kind>-<run dir name>)")
    parser.add_argument("--out", type=Path, default=Path("repro"), help="where repro/<name>/ goes (default: repro)")
    parser.add_argument("--tries", type=int, help="runs per candidate (default: from calibration)")
    parser.add_argument("--need", type=int, help="failing runs a candidate needs to be kept (default: from calibration)")
    parser.add_argument("--calibration-runs", type=int, default=3, help="runs of the original case that pick the rule (default 3)")
    parser.add_argument("--budget-s", type=float, help="stop trying candidates after this many seconds and emit the case reduced so far")
    parser.add_argument("--no-verify", action="store_true", help="skip running the emitted repro.py in a fresh process")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # vLLM's INFO lines would bury the one progress line per trial.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rollout_lab.config import ConfigError
    from rollout_lab.minimize import emit
    from rollout_lab.minimize.predicate import RunDirError, load_case, load_run
    from rollout_lab.minimize.reduce import deviating_knobs, knob_targets, minimize
    from rollout_lab.minimize.trials import Rule, TrialRunner
    from rollout_lab.models import ModelError

    console = Console(soft_wrap=True)
    try:
        if (args.tries is None) != (args.need is None):
            raise ValueError("--tries and --need go together")
        rule = Rule(args.tries, args.need) if args.tries is not None else None
        if args.calibration_runs < 1:
            raise ValueError(f"--calibration-runs={args.calibration_runs} must be at least 1")
        run = load_case(args.run_dir) if args.run_dir.is_file() else load_run(args.run_dir)
    except (RunDirError, ConfigError, ModelError, ValueError) as exc:
        print(f"rollout_lab.minimize: {exc}", file=sys.stderr)
        return 2
    name = args.name or re.sub(r"[^\w.-]+", "_", f"{run.case.fault or run.expected.kind}-{args.run_dir.resolve().name}")
    out_dir = args.out / name
    out_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]minimizing[/] {args.run_dir}: {run.description}")
    console.print(f"[bold]predicate[/]: {run.expected.describe()}")
    console.print(f"[bold]log[/]: {out_dir / 'reduction.jsonl'}")

    import torch

    targets = knob_targets(on_gpu=torch.cuda.is_available())
    deadline = time.time() + args.budget_s if args.budget_s is not None else None
    trials = TrialRunner(run.expected, out_dir / "reduction.jsonl", rule or Rule(), console, deadline)
    try:
        reduction = minimize(run, trials, targets, args.calibration_runs, rule, console)
    except ValueError as exc:
        trials.close()
        print(f"rollout_lab.minimize: {exc}", file=sys.stderr)
        return 2
    console.print(f"[bold]before[/]: {reduction.before.describe()}")
    console.print(f"[bold]after[/]:  {reduction.after.describe()}")
    console.print(f"{len(reduction.records)} runs, {reduction.seconds:.0f} s")
    verifications = emit.write(reduction, out_dir, name, verify=not args.no_verify)
    (out_dir / "minimized.json").write_text(json.dumps({
        "engine_args": reduction.case.engine_args,
        "knobs": deviating_knobs(reduction.case.engine_args, targets),
        "before": reduction.before.describe(),
        "after": reduction.after.describe(),
        "runs": len(reduction.records),
        "seconds": round(reduction.seconds, 1),
    }, indent=2))
    console.print(f"[bold]wrote[/] {out_dir / 'repro.py'} and {out_dir / 'REPORT.md'}")
    expected = emit.expected_verdicts(reduction)
    ok = True
    for v in verifications:
        good = v.verdict == expected[tuple(v.args)]
        ok &= good
        colour = "green" if good else "red"
        console.print(f"[{colour}]repro.py {' '.join(v.args)}:[/] {escape(v.describe())}", highlight=False)
        if not good:
            console.print(v.output_tail, highlight=False, markup=False)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
