"""A trial's trace on the engine: each request's SamplingParams, the trace driven (one generate call, or
step by step), and the trial's requests as the minimizer's case, their schedule kept.

    TraceRequest (workloads.py) + the workload point -> trace_params -> drive -> SampledOutputs
    TraceRequest + the workload point -> trace_requests -> standalone.Request (seed, arrival, abort)
"""
from __future__ import annotations

from typing import Optional

from rollout_lab import compat, engine, stepping
from rollout_lab.hunt.space import engine_args, sampling_args
from rollout_lab.hunt.workloads import TraceRequest, is_batch
from rollout_lab.minimize.standalone import Case, Request


def request_seed(workload: dict, index: int) -> Optional[int]:
    """The seed request `index` of the workload is sent with; None: it samples from the engine's RNG."""
    if not workload.get("sampling.per_request_seed", True):
        return None
    return (int(workload["seed"]) * 1009 + index) % (2**31)


class RejectedWorkload(ValueError):
    """vLLM refused the workload's sampling parameters (e.g. n > 1 with greedy sampling): not a bug."""


def trace_params(trace: list[TraceRequest], workload: dict) -> list:
    """SamplingParams per request; RejectedWorkload when vLLM's validation refuses them."""
    knobs = {k: v for k, v in sampling_args(workload).items() if k != "per_request_seed"}
    try:
        return [engine.sampling_params(request_seed(workload, i), **knobs) for i in range(len(trace))]
    except Exception as exc:
        if not compat.is_rejection(exc):
            raise
        raise RejectedWorkload(engine.rejection_message(exc)) from None


def valid_workload(workload: dict) -> bool:
    """Whether vLLM accepts the workload's sampling parameters (checked without an engine)."""
    try:
        trace_params([TraceRequest([0])], workload | {"seed": workload.get("seed", 0)})
    except RejectedWorkload:
        return False
    return True


def abort_step(request: TraceRequest) -> Optional[int]:
    """The engine step after which the request is aborted (stepping's clock); None: it runs to completion."""
    return None if request.abort_after is None else request.arrive_step + request.abort_after


def drive(llm, trace: list[TraceRequest], workload: dict, trial: str) -> tuple[list[engine.SampledOutput], list[int]]:
    """Run the trace; (the completions of non-aborted requests, in trace order; indices of aborted ones)."""
    params = trace_params(trace, workload)
    if is_batch(trace):
        return engine.generate(llm, [r.prompt_token_ids for r in trace], params), []
    return stepping.drive(llm, [r.prompt_token_ids for r in trace], params, [r.arrive_step for r in trace],
                          [abort_step(r) for r in trace], trial)


def trace_requests(trace: list[TraceRequest], workload: dict) -> list[Request]:
    """Every request of the trace as the minimizer's requests: each of its n completions with the seed it
    was sent with (+ k for the k-th, as vLLM seeds it; None: the engine's RNG), at its arrival and abort steps."""
    n = int(sampling_args(workload).get("n", 1))
    requests = []
    for j, r in enumerate(trace):
        seed = request_seed(workload, j)
        requests += [Request(r.prompt_token_ids, None if seed is None else seed + k, j, k, r.arrive_step, abort_step(r))
                     for k in range(n)]
    return requests


def trial_case(engine_point: dict, workload: dict, requests: list[Request]) -> Case:
    """A trial's requests as a minimizer Case (the model by its hunt name, no fault)."""
    sampling = sampling_args(workload)
    return Case(str(engine_point["model"]), engine_args(engine_point) | {"disable_log_stats": False}, requests,
                max_tokens=int(sampling.get("max_tokens", 16)), temperature=float(sampling.get("temperature", 1.0)),
                top_p=float(sampling.get("top_p", 1.0)), top_k=int(sampling.get("top_k", -1)))
