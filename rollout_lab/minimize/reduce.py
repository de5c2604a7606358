"""The reduction: shrink every dimension of a failing case while it keeps failing the same way.

    FailingRun -> calibrate (run the original case; choose the k-of-n rule)
      -> engine knobs back to vLLM's defaults, and a block_pool_head back to a fresh engine's order,
         on the original workload: all at once first, else one knob at a time, sweeping until no
         kept knob can go (each candidate with other engine arguments starts an engine)
      -> workload, on the final engine: prompts (first merged into one, then two, concatenated
         prompts, for failures that need many tokens in the cache but not many requests; then
         all requests on one prompt, for failures that need many requests but not many different
         prompts; then ddmin), the schedule of a step-driven case (schedule.py: all at once, aborts,
         arrivals merged, gaps capped), samples per prompt, max_tokens, prompt length (bisection each)
      -> Reduction

A crash while the engine starts (Expected.at_start) ran no request: only its engine knobs are reduced.

Knobs (knobs.py) go first: a knob put back can only let the workload shrink further, so the workload is
reduced once, on the final engine, instead of again after the knobs. Unless --budget-s leaves too
little for the knob pass's engine starts (knobs_fit): then the workload goes first.

A case keeps the requests its oracle needs (Oracle.min_requests: two for batch invariance): a
smaller candidate is not run. Its vLLM environment variables are no knob: one process holds one env (emit.py
flips each in fresh processes instead).

What a direct case already drops from the run: Ray and the workers (one vllm.LLM), the trainer
(a transformers float32 forward pass), the RL steps (the run's initial weights, fixed), and
rollout_lab's scheduler hook and worker extension.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

from rich.console import Console

from rollout_lab.minimize.ddmin import ddmin, smallest_failing
from rollout_lab.minimize.knobs import case_knobs, deviating_knobs, with_case_knobs
from rollout_lab.minimize.predicate import FailingRun
from rollout_lab.minimize.schedule import describe as describe_schedule, reduce_schedule
from rollout_lab.minimize.standalone import Case, Outcome
from rollout_lab.minimize.trials import Rule, TrialRecord, TrialRunner, calibrated_rule, case_key

def prompt_indices(case: Case) -> list[int]:
    """The case's prompts, in request order."""
    return list(dict.fromkeys(r.prompt_index for r in case.requests))


def with_prompts(case: Case, prompts: list[int]) -> Case:
    keep = set(prompts)
    return replace(case, requests=[r for r in case.requests if r.prompt_index in keep])


def with_samples(case: Case, samples: int) -> Case:
    return replace(case, requests=[r for r in case.requests if r.sample_index < samples])


def with_one_prompt(case: Case) -> Case:
    """Every request on the case's first prompt, with its own seed: one prompt sampled len(requests) times."""
    first = case.requests[0]
    return replace(case, requests=[
        replace(r, prompt_token_ids=first.prompt_token_ids, prompt_index=first.prompt_index, sample_index=i)
        for i, r in enumerate(case.requests)
    ])


def with_merged_prompts(case: Case, groups: int) -> Case:
    """The case's prompts cut into `groups` runs of consecutive prompts, each run concatenated into one prompt.

    Each merged prompt keeps the requests (seeds, samples) of its run's first prompt, and its last
    tokens when the concatenation would not leave room for max_tokens within max_model_len.
    """
    prompts = prompt_indices(case)
    tokens = {r.prompt_index: r.prompt_token_ids for r in case.requests}
    room = case.engine_args.get("max_model_len")
    room = None if room is None else max(int(room) - case.max_tokens, 1)
    bounds = [len(prompts) * i // groups for i in range(groups + 1)]
    merged: dict[int, list[int]] = {}
    for i in range(groups):
        run = prompts[bounds[i] : bounds[i + 1]]
        if run:
            joined = [t for p in run for t in tokens[p]]
            merged[run[0]] = joined[-room:] if room is not None else joined
    return replace(case, requests=[
        replace(r, prompt_token_ids=merged[r.prompt_index]) for r in case.requests if r.prompt_index in merged
    ])


def with_prompt_len(case: Case, length: int) -> Case:
    """Each prompt cut to its last `length` tokens: the chat turn's end, which the model answers, stays."""
    return replace(case, requests=[replace(r, prompt_token_ids=r.prompt_token_ids[-length:]) for r in case.requests])


@dataclass
class Size:
    """How big a case is, in the dimensions the reduction shrinks."""

    prompts: int
    samples_per_prompt: int
    requests: int
    max_tokens: int
    prompt_tokens: int
    knobs: list[str]
    # The schedule in words (schedule.describe; "": every request at once).
    schedule: str = ""

    @classmethod
    def of(cls, case: Case, targets: dict[str, dict]) -> "Size":
        return cls(
            prompts=len(prompt_indices(case)),
            samples_per_prompt=1 + max(r.sample_index for r in case.requests),
            requests=len(case.requests),
            max_tokens=case.max_tokens,
            prompt_tokens=max(len(r.prompt_token_ids) for r in case.requests),
            knobs=case_knobs(case, targets),
            schedule=describe_schedule(case),
        )

    def describe(self) -> str:
        knobs = ", ".join(self.knobs) or "none"
        return (
            f"{self.prompts} prompts x {self.samples_per_prompt} samples ({self.requests} requests), "
            f"max_tokens {self.max_tokens}, prompts <= {self.prompt_tokens} tokens, non-default knobs: {knobs}"
            + (f", {self.schedule}" if self.schedule else "")
        )


@dataclass
class Reduction:
    """What the minimizer found: the minimal case, how it got there, and what it cost."""

    run: FailingRun
    case: Case
    rule: Rule
    before: Size
    after: Size
    targets: dict[str, dict]
    # Every trial of this minimization, earlier sessions' included.
    records: list[TrialRecord] = field(default_factory=list)
    new_trials: int = 0
    seconds: float = 0.0
    # The --budget-s deadline passed before every candidate was tried.
    budget_spent: bool = False
    # The triage hint given up, in words ("" where the case's own request class reproduced).
    class_note: str = ""

    def final_outcome(self) -> Optional[Outcome]:
        """The outcome of the last failing run of the minimal case."""
        return self.outcome_of(self.case)

    def outcome_of(self, case: Case) -> Optional[Outcome]:
        """The outcome of the last failing trial of `case`."""
        key = case_key(case, self.run.expected)
        failing = [r for r in self.records if r.failed and r.key == key]
        return failing[-1].result() if failing else None

    def accepted(self) -> list[Case]:
        """The cases the reduction went through, original first, minimal last: each failing candidate once."""
        cases: dict[str, Case] = {}
        for record in self.records:
            candidate = record.candidate() if record.failed else None
            if candidate is not None:
                cases.setdefault(record.key, candidate)
        key = case_key(self.case, self.run.expected)
        return [c for k, c in cases.items() if k != key] + [self.case]


class Reducer:
    """Runs the passes over one FailingRun through a TrialRunner."""

    def __init__(self, trials: TrialRunner, targets: dict[str, dict]):
        self.trials, self.targets = trials, targets

    def fails(self, case: Case, stage: str, change: str) -> bool:
        if len(case.requests) < self.trials.expected.oracle.min_requests:
            return False  # too few requests for the oracle: same_failure cannot hold, so no run is spent on it
        return self.trials.fails(case, stage, change, asdict(Size.of(case, self.targets)))

    def calibrate(self, case: Case, runs: int) -> tuple[int, int]:
        """(failing runs, runs made) of the original case: `runs` runs, or fewer once the budget is spent."""
        size = asdict(Size.of(case, self.targets))
        failures = made = 0
        for i in range(runs):
            if made and self.trials.budget_spent():
                break
            failures += self.trials.run(case, "calibrate", f"original case, run {i + 1}/{runs}", size, i).failed
            made += 1
        return failures, made

    def workload(self, case: Case) -> Case:
        """Prompts, samples per prompt, max_tokens and prompt length, in that order."""
        prompts = prompt_indices(case)
        for groups in (1, 2):
            if len(prompts) > groups:
                merged = with_merged_prompts(case, groups)
                if self.fails(merged, "prompts", f"prompts {len(prompts)} -> {groups}, concatenated"):
                    case, prompts = merged, prompt_indices(merged)
                    break
        if len(prompts) > 1:
            # Before ddmin: one prompt carrying every request is the bigger cut, and ddmin over
            # prompts that each need the others' requests tries every subset in vain.
            one = with_one_prompt(case)
            if self.fails(one, "prompts", f"all {len(one.requests)} requests on prompt {prompts[0]}"):
                case, prompts = one, prompt_indices(one)
        kept = ddmin(prompts, lambda subset: self.fails(with_prompts(case, subset), "prompts", f"prompts {len(prompts)} -> {len(subset)}: {subset}"))
        case = reduce_schedule(with_prompts(case, kept), self.fails)

        samples = Size.of(case, self.targets).samples_per_prompt
        best = smallest_failing(1, samples, lambda n: self.fails(with_samples(case, n), "samples", f"samples per prompt {samples} -> {n}"))
        case = with_samples(case, best)

        tokens = case.max_tokens
        best = smallest_failing(1, tokens, lambda n: self.fails(replace(case, max_tokens=n), "max_tokens", f"max_tokens {tokens} -> {n}"))
        case = replace(case, max_tokens=best)

        length = Size.of(case, self.targets).prompt_tokens
        best = smallest_failing(1, length, lambda n: self.fails(with_prompt_len(case, n), "prompt_len", f"prompt tokens {length} -> last {n}"))
        return with_prompt_len(case, best)

    def knobs(self, case: Case) -> Case:
        """Engine knobs back to their targets: all at once if that still fails, else one at a time.

        One-at-a-time sweeps repeat until none of the kept knobs can go back, so each one left is
        needed beside the others (a knob kept early was tried beside knobs that went back later).
        A candidate tried before (the last knob alone: the all-at-once trial) is read from the cache.
        """
        knobs = case_knobs(case, self.targets)
        if not knobs:
            return case

        def fails(keep: list[str]) -> bool:
            reset = [k for k in knobs if k not in keep]
            change = f"to default: {', '.join(reset)}" + (f"; kept: {', '.join(keep)}" if keep else "")
            return self.fails(with_case_knobs(case, keep, self.targets), "knobs", change)

        keep = [] if fails([]) else list(knobs)
        swept = False
        while keep and not swept:
            swept = True
            for knob in list(keep):
                rest = [k for k in keep if k != knob]
                if fails(rest):
                    keep, swept = rest, False
        return with_case_knobs(case, keep, self.targets)


def knobs_fit(trials: TrialRunner, knobs: int) -> bool:
    """Whether the budget left holds the knob pass's engine starts (all at once, then one per knob),
    each as long as the calibration's; without a budget, always. Where it does not (a GPU engine
    compiling its CUDA graphs, a short --budget-s), the workload goes first on the engine already
    running, whose trials take seconds, and the knobs get what is left."""
    if trials.deadline is None or not knobs:
        return True
    start = max((r.engine_start_seconds for r in trials.records if r.stage == "calibrate"), default=0.0)
    return (knobs + 1) * start <= trials.deadline - time.time()


def minimize(run: FailingRun, trials: TrialRunner, targets: dict[str, dict], calibration_runs: int,
             rule: Optional[Rule], console: Console) -> Reduction:
    """Shrink the run's failing case; raises ValueError when the original case does not fail directly."""
    started = time.perf_counter()
    reducer = Reducer(trials, targets)
    case = run.case
    failures, calibration_runs = reducer.calibrate(case, calibration_runs)
    class_note = ""
    observed = observed_class(trials, case) if failures == 0 else None
    if observed is not None:
        # Triage is a hint: the replay reproduced the failure on requests of another class, which
        # the minimizer keeps from here on (the report says so).
        hinted = run.expected.request_class
        trials.expected = replace(run.expected, request_class=observed)
        run.expected = trials.expected
        console.print(f"[yellow]request class[/]: the replay flagged tokens on '{observed}' requests, not '{hinted}' ones "
                      f"as the {run.origin} did; minimizing with class '{observed}'", highlight=False)
        failures, calibration_runs = reducer.calibrate(case, calibration_runs)
        class_note = (f"the {run.origin}'s flagged requests were '{hinted}'; its replay flagged '{observed}' ones, "
                      f"so the case is minimized with class '{observed}'")
    if failures == 0:
        raise ValueError(not_reproduced(run, trials, case, calibration_runs))
    trials.rule = rule or calibrated_rule(failures, calibration_runs)
    console.print(f"[bold]rule[/]: {trials.rule.describe()} (original case failed {failures}/{calibration_runs})")
    # The engine knobs: trials with and without the pool head share an engine.
    if run.expected.at_start:
        # The engine never started: no request ran, so its knobs are all there is to reduce.
        case = reducer.knobs(case)
    elif knobs_fit(trials, len(deviating_knobs(case.engine_args, targets))):
        case = reducer.workload(reducer.knobs(case))
    else:
        console.print("[bold]order[/]: the budget left holds fewer engine starts than the knob pass may need: "
                      "the workload first, on the running engine, then the knobs")
        case = reducer.knobs(reducer.workload(case))
    trials.close()
    return Reduction(
        run=run,
        case=case,
        rule=trials.rule,
        before=Size.of(run.case, targets),
        after=Size.of(case, targets),
        targets=targets,
        records=trials.records,
        new_trials=trials.new_trials,
        seconds=time.perf_counter() - started,
        budget_spent=trials.budget_spent(),
        class_note=class_note,
    )


def calibration_outcomes(trials: TrialRunner, case: Case) -> list[Outcome]:
    """What each calibration run of `case` under the current predicate showed."""
    key = case_key(case, trials.expected)
    return [r.result() for r in trials.records if r.stage == "calibrate" and r.key == key]


def observed_class(trials: TrialRunner, case: Case) -> Optional[str]:
    """The request class of the calibration runs' flagged tokens when the predicate refused them for
    their class alone (a silent mismatch with no crash); None when nothing else kept them out."""
    if trials.expected.request_class is None:  # only a mismatch's predicate names a class
        return None
    classes = [o.request_class for o in calibration_outcomes(trials, case) if o.crash_key is None and o.num_flagged]
    return max(set(classes), key=classes.count) if classes else None


def not_reproduced(run: FailingRun, trials: TrialRunner, case: Case, runs: int) -> str:
    """Why the original case did not reproduce: what its replays showed, and what it may need that
    the replay lacks, for where it came from (an RL run, a hunt trial)."""
    shown = "; ".join(dict.fromkeys(o.describe() for o in calibration_outcomes(trials, case))) or "nothing"
    if run.origin == "hunt trial":
        cause = ("a hunt trial has no RL updates and no trainer: it may need the earlier trials its engine ran "
                 "(its history) or be rarer than the calibration runs (--calibration-runs)")
    else:
        cause = ("it may need the RL updates, the trainer, or the engine's earlier steps; or be rarer than the "
                 "calibration runs (--calibration-runs)")
    where = {"hunt trial": "the hunt trial's case", "RL run": f"step {run.step} of the run, with its initial weights"}.get(run.origin, "the case")
    return (f"the failure of {run.run_dir} ({trials.expected.describe()}) did not reproduce in {runs} runs of {where} "
            f"on a direct engine: the replays showed {shown}; {cause}")
