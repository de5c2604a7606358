"""The reduction of a case's schedule (each request's arrival and abort step, standalone.Request).

    scheduled Case -> all at once (every arrival at step 0, no abort: one generate call)
      -> aborts dropped (none, else ddmin over the aborted requests: the others run to completion)
      -> arrivals merged (each later arrival step into the one before it, its abort moved with it)
      -> gaps capped (every gap between consecutive event steps at most g, the smallest g that fails)

The requests themselves (arrivals) are dropped by the prompts pass before this one (reduce.py's ddmin
over prompts; a hunt trial's requests are a prompt each). Every candidate keeps the order of the events
it does not merge: a gap of at least 1 keeps an abort before an arrival that followed it.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

from rollout_lab.minimize.ddmin import ddmin, smallest_failing
from rollout_lab.minimize.standalone import Case, is_scheduled


def all_at_once(case: Case) -> Case:
    """Every request added at step 0 and none aborted: the case as one generate call."""
    return replace(case, requests=[replace(r, arrive_step=0, abort_step=None) for r in case.requests])


def aborted(case: Case) -> list[int]:
    """The positions of the requests the schedule aborts."""
    return [i for i, r in enumerate(case.requests) if r.abort_step is not None]


def with_aborts(case: Case, keep: list[int]) -> Case:
    """Only the aborts of the requests at positions `keep`; the others run to completion."""
    return replace(case, requests=[r if i in keep else replace(r, abort_step=None) for i, r in enumerate(case.requests)])


def arrival_steps(case: Case) -> list[int]:
    """The distinct arrival steps, in order."""
    return sorted({r.arrive_step for r in case.requests})


def with_arrival_merged(case: Case, step: int, into: int) -> Case:
    """The requests arriving at `step` arrive at `into` instead (earlier), each abort moved by as much."""
    shift = step - into
    return replace(case, requests=[
        replace(r, arrive_step=into, abort_step=None if r.abort_step is None else r.abort_step - shift)
        if r.arrive_step == step else r for r in case.requests])


def event_steps(case: Case) -> list[int]:
    """The distinct steps at which something happens (an arrival or an abort), in order."""
    return sorted({r.arrive_step for r in case.requests} | {r.abort_step for r in case.requests if r.abort_step is not None})


def with_gaps_capped(case: Case, gap: int) -> Case:
    """Every gap between consecutive event steps cut to at most `gap` (>= 1: the events keep their order),
    the first event at step 0."""
    steps, moved = event_steps(case), {}
    for i, step in enumerate(steps):
        moved[step] = 0 if i == 0 else moved[steps[i - 1]] + min(step - steps[i - 1], gap)
    return replace(case, requests=[
        replace(r, arrive_step=moved[r.arrive_step], abort_step=None if r.abort_step is None else moved[r.abort_step])
        for r in case.requests])


def widest_gap(case: Case) -> int:
    steps = event_steps(case)
    return max((b - a for a, b in zip(steps, steps[1:])), default=0)


def describe(case: Case) -> str:
    """'arrivals at steps [0, 4], 1 aborted' ('' for a case without a schedule)."""
    if not is_scheduled(case.requests):
        return ""
    return f"arrivals at steps {arrival_steps(case)}, {len(aborted(case))} aborted"


def reduce_schedule(case: Case, fails: Callable[[Case, str, str], bool]) -> Case:
    """The smallest schedule of `case` (a failing one) that still fails; `fails(candidate, stage, change)`."""
    if not is_scheduled(case.requests):
        return case
    at_once = all_at_once(case)
    if fails(at_once, "schedule", "all at once: every arrival at step 0, no abort"):
        return at_once
    aborts = aborted(case)
    if aborts:
        none = with_aborts(case, [])
        if fails(none, "schedule", f"aborts {len(aborts)} -> 0"):
            case = none
        elif len(aborts) > 1:
            keep = ddmin(aborts, lambda kept: fails(with_aborts(case, kept), "schedule", f"aborts {len(aborts)} -> {len(kept)}: {kept}"))
            case = with_aborts(case, keep)
    steps = arrival_steps(case)
    for i in range(len(steps) - 1, 0, -1):  # the last arrivals first: merging them moves nothing after them
        merged = with_arrival_merged(case, steps[i], steps[i - 1])
        if fails(merged, "schedule", f"arrivals at step {steps[i]} -> {steps[i - 1]}"):
            case = merged
    gap = widest_gap(case)
    if gap > 1:
        # `gap` itself is the case as it is (a cap at the widest gap changes nothing but where step 0 is).
        best = smallest_failing(1, gap, lambda g: g == gap or fails(with_gaps_capped(case, g), "schedule", f"gaps between steps <= {g}"))
        case = case if best == gap else with_gaps_capped(case, best)
    return case
