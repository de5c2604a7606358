"""A schedule of arrivals and aborts driven through one engine, step by step.

    requests (prompt token ids, SamplingParams, arrival step, abort step) -> compat.add_request /
        compat.step / compat.abort_requests -> the finished requests' SampledOutputs + the aborted ones

The clock: one tick per engine step, skipping ahead to the next arrival while the engine is idle
(an idle engine's steps do nothing, so the ticks would change nothing either). A request arriving at
step s is added before step s runs; one with abort step t is aborted after step t ran, unless it
finished by then. The hunt drives its step-driven traces this way (hunt/trace.py), the minimizer
replays a case's schedule this way (standalone.sample), and an emitted repro.py steps the same loop
on vLLM's public API (script_run.SCHEDULE_LOOP).
"""
from __future__ import annotations

from typing import Optional

from rollout_lab import compat, engine

# Engine steps a schedule may take before it counts as stuck.
MAX_ENGINE_STEPS = 20000


def drive(llm, prompts: list[list[int]], params: list, arrive_steps: list[int], abort_steps: list[Optional[int]],
          tag: str) -> tuple[list[engine.SampledOutput], list[int]]:
    """Run the schedule; (the completions of the requests it does not abort, in request order; the aborted indices).

    A request given an abort step is never returned, even when it finished before its abort: which requests
    come back must follow from the schedule alone (minimize.standalone.completed), not from timing, so that
    an oracle that re-runs the completed requests pairs each output with its own request.

    Request i goes to vLLM as "<tag>-<i>" (the SampledOutput's request_id names it)."""
    pending = sorted(range(len(prompts)), key=lambda i: (arrive_steps[i], i))
    added: list[int] = []
    finished: dict[int, object] = {}
    aborted: list[int] = []
    step = 0
    while pending or compat.has_unfinished_requests(llm):
        if pending and not compat.has_unfinished_requests(llm):
            step = max(step, arrive_steps[pending[0]])
        while pending and arrive_steps[pending[0]] <= step:
            i = pending.pop(0)
            compat.add_request(llm, f"{tag}-{i}", prompts[i], params[i])
            added.append(i)
        for out in compat.step(llm):
            finished[int(out.request_id.rsplit("-", 1)[1])] = out
        to_abort = [i for i in added if abort_steps[i] is not None and step >= abort_steps[i]
                    and i not in finished and i not in aborted]
        if to_abort:
            compat.abort_requests(llm, [f"{tag}-{i}" for i in to_abort])
            aborted.extend(to_abort)
        step += 1
        if step > MAX_ENGINE_STEPS:
            raise TimeoutError(f"schedule still running after {MAX_ENGINE_STEPS} engine steps")
    kept = [finished[i] for i in range(len(prompts)) if abort_steps[i] is None]
    return engine.sampled_outputs(kept), sorted(aborted)
