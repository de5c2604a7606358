"""`python -m rollout_lab.minimize <run_dir>`: shrink a failed run into repro/<name>/repro.py + REPORT.md.

Also takes a case file (a hunt finding's case.json, see predicate.load_case) in place of a run dir.
Besides repro.py, REPORT.md and MINIMIZATION.md it writes minimized.json: the minimal case's engine arguments, the
knobs that stayed off their defaults (what switches the failure on), sizes before and after; and case.json, the
emitted case (its warm-up included) as a case file that `python -m rollout_lab.localize` takes.

Exit status: 0 when the emitted repro.py reproduces in a fresh process and, with a planted fault,
is clean without it (or --no-verify); 1 when not; 2 when the run dir cannot be minimized (missing,
did not fail, needs the trainer). When the minimal case does not fail in a fresh process (it needed
the history of the minimizer's long-lived engine), it is emitted behind the smallest warm-up (earlier requests on the
same engine) that makes it fail there, else the smallest accepted reduction that does.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

# The emitted case as a handoff.CaseFile, beside repro.py.
CASE_NAME = "case.json"


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
    parser.add_argument("--confirm-only", action="store_true",
                        help="confirm the emitted repro.py in a fresh process (finding the warm-up a history-dependent failure "
                             "needs) but measure no knob flips (the hunt verifies on its own)")
    return parser.parse_args(argv)


def apply_env(env: dict[str, str]) -> None:
    """The case's vLLM environment variables, for every trial of this process: vLLM reads some when
    imported and caches all of them once an engine has run, so they are set before it is imported."""
    if env and "vllm" in sys.modules:
        raise ValueError(f"the case sets {', '.join(sorted(env))}, but vLLM was imported before they could be set")
    os.environ.update(env)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # vLLM's INFO lines would bury the one progress line per trial.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rollout_lab.config import ConfigError
    from rollout_lab.minimize import emit
    from rollout_lab.minimize.handoff import CaseFile, MinimizedResult
    from rollout_lab.minimize.predicate import RunDirError, load_case, load_run
    from rollout_lab.minimize.knobs import case_knobs, knob_targets
    from rollout_lab.minimize.reduce import Size, minimize
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
        apply_env(run.case.env)
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
    confirmation, flips = emit.write(reduction, out_dir, verify=not args.no_verify, console=console, flip=not args.confirm_only)
    case = confirmation.case if confirmation is not None else reduction.case
    MinimizedResult(
        engine_args=case.engine_args,
        knobs=case_knobs(case, targets),
        before=reduction.before.describe(),
        after=Size.of(case, targets).describe(),
        runs=len(reduction.records),
        seconds=round(reduction.seconds, 1),
        steps_back=confirmation.steps_back if confirmation is not None else None,
        verify_args=list(emit.lab_args(reduction, case)),
        env=case.env,
        block_pool_head=case.block_pool_head,
        warmup_requests=len(case.warmup),
        class_note=reduction.class_note,
    ).write(out_dir)
    # The emitted case for the localizer: a history-dependent one fails only behind its warm-up.
    CaseFile(run.config.model.name, case, reduction.run.expected, f"minimized from {run.description}").write(out_dir / CASE_NAME)
    console.print(f"[bold]wrote[/] {out_dir / 'repro.py'}, {out_dir / 'REPORT.md'}, {out_dir / emit.LOG_NAME} and {out_dir / CASE_NAME}")
    ok = True
    if confirmation is not None:
        ok = confirmation.verification.verdict == "REPRODUCED"
        colour = "green" if ok else "red"
        console.print(f"[{colour}]repro.py in a fresh process:[/] {escape(confirmation.verification.describe())}", highlight=False)
        if case.warmup:
            console.print(f"[yellow]the failure depends on the engine's history[/]: the minimal case passed in a fresh process; "
                          f"it fails there after a warm-up of {len(case.warmup)} request(s), which repro.py runs first", highlight=False)
        if confirmation.steps_back:
            console.print(f"[yellow]the failure depends on the engine's history[/]: the minimal case passed in a fresh "
                          f"process; emitted the case {confirmation.steps_back} accepted reduction(s) back", highlight=False)
        if not ok:
            console.print(confirmation.verification.output, highlight=False, markup=False)
        for flip in flips:
            console.print(f"  {escape(flip.describe())}", highlight=False)
        # Without its planted fault the repro must be clean: the failure is the fault's.
        ok &= all(f.verdicts.count("NOT REPRODUCED") == len(f.verdicts) for f in flips if f.fault_off)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
