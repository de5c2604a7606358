"""Triage: what a trial's result is to the hunt. A harness error or a finding; a new finding, a
known bug or a repeat; the duplicate of a minimized finding; one not worth minimizing; the engine
behaviours it exercised (the search's coverage feedback from the engine itself)."""
from __future__ import annotations

from typing import Optional

from rollout_lab.hunt.protocol import Finding, TrialResult
from rollout_lab.oracles import oracle_of


def is_harness_error(result: TrialResult) -> bool:
    """A crash raised by rollout_lab's own code with no vLLM frame on the stack: a lab bug, not a finding."""
    crash = result.crash
    return result.status == "crash" and crash is not None and not crash.vllm_frames and "rollout_lab/" in crash.traceback


def duplicate_of(finding: Finding, minimized: list[Finding]) -> Optional[Finding]:
    """The minimized mismatch finding that already explains `finding`, if any: same oracle, model
    and request class, and every knob of its minimal trigger set in `finding`'s engine as in its
    minimal case (dtype is no part of it unless the minimizer kept it), and the same vLLM environment
    variables. Crash signatures are already specific (exception type and vLLM frames); they are left alone."""
    from rollout_lab.hunt.space import engine_args, engine_env
    from rollout_lab.minimize.knobs import POOL_HEAD, knob_args

    if finding.kind != "mismatch":
        return None
    sig, args, env = finding.signature, engine_args(finding.engine), engine_env(finding.engine)
    for other in minimized:
        if other.kind != "mismatch" or other is finding or other.minimized is None:
            continue
        o = other.signature
        if (o.oracle, o.model, o.request_class) != (sig.oracle, sig.model, sig.request_class):
            continue
        names = [n for knob in other.minimized.knobs for n in knob_args(knob) if knob != POOL_HEAD]
        # A minimal case that kept the pool head needs blocks from there up: a finding from a fresh pool is another one.
        head_matches = POOL_HEAD not in other.minimized.knobs or finding.engine.get(POOL_HEAD) == other.minimized.block_pool_head
        # vLLM's environment variables are not reduced (one process, one env): all of them must match.
        if all(args.get(n) == other.minimized.engine_args.get(n) for n in names) and env == other.minimized.env and head_matches:
            return other
    return None


def why_not_minimized(finding: Finding) -> Optional[str]:
    """Why the minimizer cannot replay this finding (None: it can)."""
    return oracle_of(finding.signature).why_not_minimized()


def behaviours(result: TrialResult) -> list[str]:
    """The engine behaviours a trial exercised, from what vLLM reported."""
    if result.status in ("crash", "hang", "died"):
        return [f"status:{result.status}"]
    if result.status not in ("ok", "fail"):
        return []
    seen = {
        "preempted": result.preempted_requests > 0,
        "prefix_cache_hit": result.cached_requests > 0,
        "aborted": result.num_aborted > 0,
        "stepped_trace": not result.batch,
    }
    return [name for name, on in seen.items() if on] or ["plain"]
