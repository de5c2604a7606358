"""What REPORT.md and MINIMIZATION.md say about a reduction: its title, description, where it fails,
expected and actual, the upstream search, and the minimization log.

    Reduction + the emitted case + fresh-process runs (fresh.Confirmation, fresh.Flip) -> report() -> REPORT.md
    Reduction -> minimization_log() -> MINIMIZATION.md
"""
from __future__ import annotations

import json
import textwrap
from typing import Optional

from rollout_lab.localize.report import where_inside
from rollout_lab.minimize import bug_report
from rollout_lab.minimize.fresh import Confirmation, Flip
from rollout_lab.minimize.knobs import KNOB_ARGS, POOL_HEAD, case_knobs, knob_args, knob_text
from rollout_lab.minimize.reduce import Reduction, Size
from rollout_lab.minimize.standalone import Case

# The minimization log (stages, every trial) goes here, beside REPORT.md.
LOG_NAME = "MINIMIZATION.md"

def title(reduction: Reduction, case: Case, device: str) -> str:
    """A title a person would write, at most bug_report.MAX_TITLE characters: the symptom, the trigger knobs
    (names only; their values are in the script), the device."""
    expected = reduction.run.expected
    values = {POOL_HEAD: case.block_pool_head, **case.engine_args}
    knobs = [n for knob in case_knobs(case, reduction.targets) for n in knob_args(knob) if n in values]
    fault = " [planted fault]" if case.fault else ""
    what = expected.oracle.report_symptom(expected, case)
    # The trigger knobs with their values if they fit, else their names, else as many names as fit.
    candidates = [", ".join(f"{n}={values[n]}" for n in knobs)] + [
        ", ".join(knobs[:count]) + (" ..." if count < len(knobs) else "") for count in range(len(knobs), 0, -1)]
    for under in candidates if knobs else [""]:
        text = f"{bug_report.TITLE_PREFIX}{what}{' with ' + under if under else ''} ({device}){fault}"
        if len(text) <= bug_report.MAX_TITLE:
            return text
    text = f"{bug_report.TITLE_PREFIX}{what} ({device}){fault}"
    return text if len(text) <= bug_report.MAX_TITLE else text[: bug_report.MAX_TITLE - 3] + "..."


def description(reduction: Reduction, case: Case) -> str:
    """Two or three plain sentences: the minimal workload, and what goes wrong with it."""
    expected, outcome = reduction.run.expected, reduction.final_outcome()
    size = Size.of(case, reduction.targets)
    knobs = knob_text(case, size.knobs) or "vLLM's defaults for the engine knobs"
    workload = (f"{size.requests} request(s) on {size.prompts} prompt(s) of up to {size.prompt_tokens} tokens, "
                f"max_tokens={case.max_tokens}, " + ("sampled from the engine's seeded RNG" if any(
                    r.seed is None for r in case.requests) else "each with its own seed"))
    if size.schedule:
        workload += f", the engine stepped with {size.schedule}"
    return f"With {knobs} and {workload}, {expected.oracle.report_happened(expected, case, outcome)}."


def where_it_fails(reduction: Reduction, case: Case) -> list[str]:
    """Which requests fail in the minimal case, and where the run's flagged tokens sat in the caches."""
    expected, outcome = reduction.run.expected, reduction.outcome_of(case)
    lines = expected.oracle.report_where(expected, outcome) if outcome is not None else []
    placement = reduction.run.placement
    if placement:
        lines.append(f"- In the original run (scheduling records): {placement}.")
    # The localizer's per-layer capture compares against the same float32 reference.
    if expected.oracle.needs_reference:
        lines += where_inside(reduction.run.run_dir)
    return lines


def _log_summary(reduction: Reduction) -> list[str]:
    # "did not run": the candidate's engine did not start (kept out like a pass, but no evidence either way).
    rows = ["| stage | runs | failed | did not run | seconds | last change |", "| --- | --- | --- | --- | --- | --- |"]
    stages: dict[str, list] = {}
    for record in reduction.records:
        stages.setdefault(record.stage, []).append(record)
    for stage, records in stages.items():
        not_run = sum(not r.failed and r.result().at_start for r in records)
        rows.append(
            f"| {stage} | {len(records)} | {sum(r.failed for r in records)} | {not_run} | "
            f"{sum(r.seconds for r in records):.0f} | {records[-1].change} |"
        )
    return rows


def minimization_log(reduction: Reduction, confirmation: Optional[Confirmation]) -> str:
    """MINIMIZATION.md: how the case was found, stage by stage."""
    run, expected = reduction.run, reduction.run.expected
    lines = [
        f"# How `{run.run_id}` was minimized", "",
        f"`python -m rollout_lab.minimize {run.run_dir}`; every trial is a line of `reduction.jsonl`.", "",
        f"- Run failure: {run.description}.",
        f"- Predicate (\"the same failure\"): {expected.describe()}.",
        f"- Flakiness rule: {reduction.rule.describe()}.",
        "- Dropped from the run: Ray and the workers (one `vllm.LLM`), the trainer (a transformers float32 "
        f"forward pass), the RL steps (step {run.step} of {run.config.loop.steps} with the run's initial, fixed "
        "weights), rollout_lab's scheduler hook and worker extension.",
        f"- Before: {reduction.before.describe()}.",
        f"- After: {reduction.after.describe()}.",
        "- Knob defaults: " + "; ".join([f"{knob} -> {reduction.targets[knob] or 'vLLM default'}" for knob in KNOB_ARGS] + (
            [f"{POOL_HEAD} -> None (the free block queue as a fresh engine's)"] if run.case.block_pool_head is not None else [])) + ".",
        f"- Runs: {len(reduction.records)} ({reduction.new_trials} in the last session), "
        f"{sum(r.seconds for r in reduction.records):.0f} s of trials; last session {reduction.seconds:.0f} s wall.",
        "", *_log_summary(reduction),
    ]
    if confirmation is not None and confirmation.walked_back:
        lines += ["", "## Fresh-process confirmation", "",
                  *[f"- {size}: {verdict}" for size, verdict in confirmation.walked_back]]
    return "\n".join(lines) + "\n"


def expected_actual(reduction: Reduction, case: Case) -> tuple[str, str]:
    """("Expected", "Actual"), a line each."""
    expected, outcome = reduction.run.expected, reduction.outcome_of(case)
    return expected.oracle.report_expected_actual(expected, case, outcome)


def upstream_query(reduction: Reduction, case: Case) -> str:
    """What to search vLLM's issues for: the exception and its function, or the symptom, and the trigger knobs."""
    expected = reduction.run.expected
    knobs = tuple(name for knob in case_knobs(case, reduction.targets) for name in knob_args(knob))[:2]
    return expected.oracle.report_query(expected, case, knobs)


def report(reduction: Reduction, source: str, env_text: str, confirmation: Optional[Confirmation],
           flips: list[Flip], device: str, repro_path: str, upstream: Optional[bug_report.Upstream] = None) -> str:
    """REPORT.md in vLLM's bug template (bug_report.BugReport words it; the log goes to MINIMIZATION.md)."""
    case = confirmation.case if confirmation is not None else reduction.case
    expected, actual = expected_actual(reduction, case)
    # Relative: the run's own path (the localize command's argument) means nothing to a maintainer.
    notes = [bug_report.relative_paths(line[2:]) for line in where_it_fails(reduction, case)]
    if case.fault:
        notes.insert(0, f"**Not a vLLM bug as shipped**: it needs rollout_lab's planted fault `{case.fault}` "
                        f"({json.dumps(case.fault_params, sort_keys=True)}), which repro.py carries (labelled); `--no-fault` runs vLLM as shipped.")
    if confirmation is not None and confirmation.steps_back:
        notes.append(f"The failure depends on the engine's history: the minimal case failed in the minimizer's long-lived "
                     f"engine but not in a fresh process, so this is the smallest accepted reduction that fails fresh "
                     f"({confirmation.steps_back} reduction(s) before the minimal one; {LOG_NAME} lists each one tried).")
    notes.append(f"How it was found and minimized: [{LOG_NAME}]({LOG_NAME}).")
    if case.warmup:
        notes.append(f"The failure depends on the engine's history: the case passes on a fresh engine and fails once the same "
                     f"engine has served {len(case.warmup)} earlier request(s) of {case.warmup_max_tokens} tokens (WARMUP, which "
                     f"repro.py runs first; {LOG_NAME} lists each warm-up tried in a fresh process).")
    if reduction.class_note:
        notes.append(f"Request class: {reduction.class_note}.")
    if confirmation is None:
        go_away, output = ["(not measured: --no-verify)"], "(not run: --no-verify)"
    else:
        output = confirmation.verification.output
        go_away = (["(not measured: the minimization budget, --budget-s, was spent)"] if reduction.budget_spent
                   else [f.describe() for f in flips] or ["every engine knob is at vLLM's default already"])
    command = " ".join(["python -I repro.py", *(confirmation.verification.args if confirmation is not None else [])])
    return bug_report.BugReport(
        title=title(reduction, case, device),
        environment=env_text,
        summary=textwrap.fill(description(reduction, case), 100),
        script=source,
        command=bug_report.relative_paths(command),
        expected=expected,
        actual=actual,
        output=output,
        go_away=go_away,
        release_range=f"Not bisected yet: `python -m rollout_lab.bisect {bug_report.relative_paths(repro_path)} --versions A,B,C`.",
        upstream=upstream or bug_report.Upstream(upstream_query(reduction, case), None, "not searched"),
        draft=("the minimization budget (--budget-s) ran out before the case was reduced; this is the case as far as "
               "it got, its knobs not flipped" if reduction.budget_spent else ""),
        notes=notes,
    ).render()
