"""Trials: run a candidate Case on a shared engine reset to a fresh one's state; decide, cache, log.

An engine start costs tens of seconds, so candidates with the same engine arguments share one
engine and a new one starts only when the arguments change, or after a crash (a crashed engine is
in no known state). Between trials the engine is put back to what a fresh engine (a repro.py) sees
(engine.reset).

Every run of a candidate is one line of <out>/reduction.jsonl, keyed by a hash of the candidate
and the predicate: a resumed minimization reads it back and repeats none of them.
"""
from __future__ import annotations

import gc
import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

from rich.console import Console

from rollout_lab import compat, engine
from rollout_lab.minimize.standalone import Case, Expected, Outcome, crash_outcome, run_case, same_failure, start_engine
from rollout_lab.oracles.records import TokenDiff
from rollout_lab.reference import load_reference


@dataclass
class Rule:
    """Keep a candidate when it fails in at least `need` of `tries` runs; stop once that is decided."""

    tries: int = 1
    need: int = 1

    def __post_init__(self):
        if not 1 <= self.need <= self.tries:
            raise ValueError(f"need={self.need} of tries={self.tries}: need must lie in [1, tries]")

    def decision(self, failures: int, runs: int) -> Optional[bool]:
        """True or False once `failures` in `runs` decide the candidate, None while they do not."""
        if failures >= self.need:
            return True
        if failures + (self.tries - runs) < self.need:
            return False
        return None

    def describe(self) -> str:
        if self.tries == 1:
            return "a candidate is kept when its single run fails (the failure was deterministic)"
        return f"a candidate is kept when it fails in at least {self.need} of {self.tries} runs (runs stop once decided)"


def calibrated_rule(failures: int, runs: int) -> Rule:
    """The rule for a failure seen in `failures` of `runs` runs of the original case.

    Always failing: one run decides. Flaky: a candidate is kept when it fails at least once in
    as many runs as the calibration took, so one as flaky as the original is rarely dropped.
    """
    if not 0 < failures <= runs:
        raise ValueError(f"failures={failures} of runs={runs}: a rule needs a failure that reproduced")
    return Rule(1, 1) if failures == runs else Rule(tries=runs, need=1)


@dataclass
class TrialRecord:
    """One run of one candidate: a line of reduction.jsonl."""

    trial: int
    key: str
    attempt: int
    stage: str
    change: str
    # The candidate's reduce.Size, as a dict.
    size: dict
    failed: bool
    outcome: dict
    seconds: float
    engine_start_seconds: float = 0.0
    # The candidate itself (standalone.Case as a dict), so that a later stage can re-run it.
    case: Optional[dict] = None

    def candidate(self) -> Optional[Case]:
        """The candidate this run tried (None in logs written before cases were recorded)."""
        if self.case is None:
            return None
        from rollout_lab.minimize.handoff import case_from_json

        return case_from_json(self.case)

    def result(self) -> Outcome:
        fields = dict(self.outcome)
        fields["worst"] = [TokenDiff(**d) for d in fields.get("worst", [])]
        return Outcome(**fields)


def case_key(case: Case, expected: Expected) -> str:
    """A hash of everything that decides a trial's verdict."""
    fields = asdict(case)
    if not case.warmup:  # keys of cases without a warm-up stay those logged before it existed
        del fields["warmup"], fields["warmup_max_tokens"]
    for request in fields["requests"]:  # and of requests without a schedule, those logged before schedules
        if not request["arrive_step"] and request["abort_step"] is None:
            del request["arrive_step"], request["abort_step"]
    payload = json.dumps({"case": fields, "expected": asdict(expected)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def read_log(path: Path, console: Optional[Console] = None) -> list[TrialRecord]:
    """The trials of an earlier (possibly interrupted) minimization. A torn last line is skipped; lines
    that no longer fit TrialRecord (a log of another rollout_lab) are named in one line on `console`
    and left in the file: their candidates run again."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    records, unfit, first = [], 0, ""
    for number, line in enumerate(lines, 1):
        try:
            record = TrialRecord(**json.loads(line))
            record.result(), record.candidate()  # the outcome and case must fit their records too
        except json.JSONDecodeError as exc:
            if number == len(lines):
                continue
            unfit, first = unfit + 1, first or f"line {number}: {exc}"
            continue
        except TypeError as exc:
            unfit, first = unfit + 1, first or f"line {number}: {unfit_reason(exc)}"
            continue
        records.append(record)
    if unfit and console is not None:
        console.print(f"[yellow]{path}: {unfit} of {len(records) + unfit} lines do not fit this rollout_lab's trial "
                      f"record ({first}); they stay in the file, and their candidates run again[/]", highlight=False)
    return records


def unfit_reason(exc: TypeError) -> str:
    """A dataclass's TypeError in the log's words: "X.__init__() got an unexpected keyword argument 'k'" -> "unexpected key 'k'"."""
    return str(exc).split(") ", 1)[-1].replace("got an unexpected keyword argument", "unexpected key")


class TrialRunner:
    """Decides candidates under a Rule: runs them (or reads them from the log) and prints a line each."""

    def __init__(self, expected: Expected, log_path: Path, rule: Rule, console: Console,
                 deadline: Optional[float] = None):
        self.expected, self.log_path, self.rule, self.console = expected, log_path, rule, console
        # time.time() after which no candidate is tried: the reduction keeps the case it has.
        self.deadline = deadline
        self.said_spent = False
        self.records = read_log(log_path, console)
        self.cache = {(r.key, r.attempt): r for r in self.records}
        self.new_trials = 0
        self.llm = None
        self.engine_args_key: Optional[str] = None
        self.reference = None
        self.reference_path: Optional[str] = None

    def budget_spent(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline

    def fails(self, case: Case, stage: str, change: str, size: dict) -> bool:
        """Whether the candidate shows the expected failure, by the rule (no, once the budget is spent)."""
        if self.budget_spent():
            if not self.said_spent:
                self.console.print("[yellow]budget spent[/]: no more candidates; the case stays as reduced so far")
                self.said_spent = True
            return False
        failures = 0
        for attempt in range(self.rule.tries):
            failures += self.run(case, stage, change, size, attempt).failed
            decided = self.rule.decision(failures, attempt + 1)
            if decided is not None:
                return decided
        raise AssertionError("a Rule decides by its last try")

    def run(self, case: Case, stage: str, change: str, size: dict, attempt: int) -> TrialRecord:
        """One run of the candidate (the cached one when this run was made before)."""
        key = case_key(case, self.expected)
        cached = self.cache.get((key, attempt))
        if cached is not None:
            # The log keeps what the run showed; the verdict follows today's predicate.
            cached.failed = same_failure(self.expected, cached.result())
            self._print(cached, cached=True)
            return cached
        started = time.perf_counter()
        outcome, engine_seconds = self._outcome(case)
        record = TrialRecord(
            trial=len(self.records) + 1,
            key=key,
            attempt=attempt,
            stage=stage,
            change=change,
            size=size,
            failed=same_failure(self.expected, outcome),
            outcome=asdict(outcome),
            seconds=round(time.perf_counter() - started, 2),
            engine_start_seconds=round(engine_seconds, 2),
            case=asdict(case),
        )
        self.records.append(record)
        self.cache[(key, attempt)] = record
        self.new_trials += 1
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as log:
            log.write(json.dumps(asdict(record)) + "\n")
        self._print(record, cached=False)
        return record

    def _engine(self, case: Case) -> float:
        """Make self.llm a fresh-state engine with the case's arguments; seconds spent starting one (0: reused)."""
        args_key = json.dumps([case.model, case.engine_args], sort_keys=True)
        if self.llm is not None and args_key == self.engine_args_key:
            try:
                engine.reset(self.llm)
                return 0.0
            except RuntimeError:
                pass
        self.close()
        started = time.perf_counter()
        self.llm = start_engine(case, with_fault=False)
        engine.remember_clean(self.llm)
        self.engine_args_key = args_key
        return time.perf_counter() - started

    def _outcome(self, case: Case) -> tuple[Outcome, float]:
        """The candidate's outcome on a fresh-state engine, and the seconds spent starting one."""
        # Loaded before the engine starts or resets: loading may draw from the RNG that unseeded requests sample with.
        reference = self._reference(case.model) if self.expected.oracle.needs_reference else None
        started = time.perf_counter()
        try:
            engine_seconds = self._engine(case)
        except Exception as exc:  # an engine that cannot start is an outcome
            return replace(crash_outcome(exc), at_start=True), time.perf_counter() - started
        if case.fault is not None:
            engine.install_fault(self.llm, case.fault, case.fault_params)
        outcome = run_case(self.llm, reference, case, self.expected)
        if outcome.crash_key is not None:
            self.close()
        return outcome, engine_seconds

    def _reference(self, model_path: str):
        if self.reference_path != model_path:
            self.reference, self.reference_path = load_reference(model_path), model_path
        return self.reference

    def close(self) -> None:
        """Shut the engine down and free its memory."""
        if self.llm is not None:
            compat.shutdown(self.llm)
        self.llm, self.engine_args_key = None, None
        gc.collect()

    def _print(self, record: TrialRecord, cached: bool) -> None:
        # A candidate whose engine did not start is rejected like a pass (the change is not kept),
        # but it showed nothing about the failure: say so rather than "pass".
        verdict = "[red]FAIL[/]" if record.failed else "[yellow]did not run[/]" if record.result().at_start else "[green]pass[/]"
        when = "cached" if cached else f"{record.seconds:6.1f}s"
        start_note = f" (engine start {record.engine_start_seconds:.0f}s)" if record.engine_start_seconds and not cached else ""
        self.console.print(
            f"[bold]#{record.trial:<3}[/] {record.stage:<10} {record.change:<48} {verdict} {when}{start_note}  "
            f"[dim]{record.result().describe()}[/]",
            highlight=False,
        )
