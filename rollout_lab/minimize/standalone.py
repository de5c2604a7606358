"""One trial of a case: one vllm.LLM, a transformers float32 reference, the predicate.

The emitted repro.py (script.py) states the same predicate in a few lines of its own.

    Case (model, engine args, fault, requests) -> sample (vLLM) -> reference_logprobs
        (transformers, teacher forcing) -> Outcome (crash key, flagged tokens) -> same_failure
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field, replace
from typing import Optional

from rollout_lab import compat, engine, pressure, stepping
from rollout_lab.invariance import compare, output_of
from rollout_lab.reference import reference_logprobs

# Requests a case needs to be a batch: with one, "alone" and "in the batch" are the same run twice.
MIN_BATCH = 2


@dataclass
class Request:
    """One sampled completion: the prompt's token ids and the request's own sampling seed."""

    prompt_token_ids: list[int]
    # None: sampled from the engine's RNG, which the engine's `seed` argument seeds.
    seed: Optional[int]
    # Coordinates in the run the case came from (reports only).
    prompt_index: int = -1
    sample_index: int = -1
    # Its schedule (a hunt trial's step-driven trace; rollout_lab/stepping.py's clock): added before engine
    # step `arrive_step`, aborted after step `abort_step` (None: it runs to completion). A case whose
    # requests all arrive at 0 and none is aborted runs in one generate call.
    arrive_step: int = 0
    abort_step: Optional[int] = None


@dataclass
class Case:
    """Everything one trial, or a repro.py, runs."""

    model: str
    # vllm.LLM keyword arguments besides `model`; a knob left out takes vLLM's default.
    engine_args: dict
    requests: list[Request]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    # A planted fault from rollout_lab/faults.py, installed through collective_rpc; None: vLLM as shipped.
    fault: Optional[str] = None
    fault_params: dict = field(default_factory=dict)
    # vLLM environment variables (VLLM_BATCH_INVARIANT, ...), set before vLLM is imported: vLLM
    # reads some at import and caches them all once an engine runs, so one process has one env.
    env: dict[str, str] = field(default_factory=dict)
    # Where the engine's free block queue starts before the requests, as a fraction of its blocks (a
    # pressure preset's block_pool_head, rollout_lab/pressure.py): they get the top block ids and
    # state slots first, as on a big cache. None: a fresh engine's order, lowest ids first.
    block_pool_head: Optional[float] = None
    # The engine's history the failure needs (emit.py finds it when the case passes in a fresh
    # process): requests sampled first, in one generate call of warmup_max_tokens tokens each, and
    # not judged. Empty: a fresh engine.
    warmup: list[Request] = field(default_factory=list)
    warmup_max_tokens: int = 0


@dataclass
class Expected:
    """The failure to keep: the same crash key, flagged tokens on the same class of requests, or
    (batch_invariance) a target request whose output alone differs bitwise from its output in the batch."""

    kind: str  # "crash", "mismatch" or "batch_invariance"
    spike_threshold: float
    crash_key: Optional[str] = None
    request_class: Optional[str] = None
    # batch_invariance: the first `targets` requests are each run again alone and compared.
    targets: Optional[int] = None
    # crash: vLLM raised it while the engine started, so no request ever ran and only engine knobs
    # can matter (the minimizer reduces those alone; the crash must come at start again).
    at_start: bool = False

    def describe(self) -> str:
        if self.kind == "crash":
            return f"a crash with key {self.crash_key}" + (" while the engine starts" if self.at_start else "")
        if self.kind == "batch_invariance":
            return (f"one of the first {self.targets} requests, run again alone on the same engine after the whole "
                    f"batch, gives other sampled tokens or sampled-token logprobs (bitwise) than in the batch")
        where = {
            "preempted": "every flagged request preempted, or reusing a preempted one's KV through the prefix cache",
            "prefix_cached": "every flagged request a prefix-cache hit, none preempted",
            "any": "flagged requests neither needing a preemption nor, in the run, a prefix-cache hit",
        }[self.request_class]
        return (
            f"at least one token with |vLLM - transformers float32| logprob > {self.spike_threshold:g}, "
            f"request class '{self.request_class}' ({where})"
        )


@dataclass
class TokenDiff:
    """One sampled token: vLLM's logprob beside the reference's."""

    request: int
    position: int
    token_id: int
    vllm_logprob: float
    reference_logprob: float
    abs_diff: float
    num_preemptions: Optional[int]  # None: unknown (no per-request count in this vLLM)
    num_cached_tokens: int


@dataclass
class Outcome:
    """What one run of a case showed."""

    crash_key: Optional[str] = None
    crash_message: str = ""
    num_requests: int = 0
    num_tokens: int = 0
    num_flagged: int = 0
    max_abs_diff: float = 0.0
    request_class: Optional[str] = None
    num_preempted_requests: int = 0
    # Requests whose preemption count this vLLM does not keep (compat.preemptions_of is None).
    num_unknown_preemptions: int = 0
    worst: list[TokenDiff] = field(default_factory=list)
    # batch_invariance: the target requests run alone, those whose output differed (request
    # indices), and the first position whose sampled token differed (None: only logprobs did).
    targets: int = 0
    differing: list[int] = field(default_factory=list)
    first_token_diff: Optional[int] = None
    # The crash came from starting the engine (out of memory beside another job, a refused
    # configuration): unless it is the expected failure, the candidate did not run at all.
    at_start: bool = False

    def describe(self) -> str:
        if self.crash_key is not None and self.at_start:
            return f"the engine did not start: {self.crash_key}: {self.crash_message}"
        if self.crash_key is not None:
            return f"crash {self.crash_key}: {self.crash_message}"
        if self.targets:
            first = "" if self.first_token_diff is None else f", first other token at position {self.first_token_diff}"
            return (f"{len(self.differing)}/{self.targets} targets differ alone vs in a batch of {self.num_requests} "
                    f"(max |diff| {self.max_abs_diff:.3g}{first})")
        if not self.num_tokens:
            return "no crash"
        flagged = f"{self.num_flagged}/{self.num_tokens} tokens flagged, max diff {self.max_abs_diff:.3g}"
        where = f" on '{self.request_class}' requests" if self.request_class else ""
        if self.num_unknown_preemptions:
            return f"{flagged}{where} (preemptions unknown for {self.num_unknown_preemptions}/{self.num_requests} requests)"
        return f"{flagged}{where} ({self.num_preempted_requests}/{self.num_requests} requests preempted)"


def request_class(flagged: list[tuple[Optional[int], int]]) -> Optional[str]:
    """Class of the requests holding flagged tokens, from (num_preemptions, num_cached_tokens) each;
    a preemption count of None is unknown (vLLM before 0.30 keeps none) and never counts as one.

    preempted: every flagged request was preempted or reused KV through the prefix cache, and one
    at least was preempted (wrong KV computed after a resume spreads through the cache).
    prefix_cached: every flagged request hit the prefix cache, none was preempted.
    any: some flagged request was neither (or may have been: its count is unknown).
    """
    if not flagged:
        return None
    if any(not compat.was_preempted(preemptions) and cached == 0 for preemptions, cached in flagged):
        return "any"
    if any(compat.was_preempted(preemptions) for preemptions, _ in flagged):
        return "preempted"
    return "prefix_cached"


# Request classes that count as the same failure as each expected one. A failure on ordinary
# requests may land on prefix-cache hits only once fewer requests remain; a failure that needed a
# preemption must still need one, and one that did not must not.
SAME_CLASS = {"preempted": ("preempted",), "prefix_cached": ("prefix_cached",), "any": ("any", "prefix_cached")}


def same_failure(expected: Expected, outcome: Outcome) -> bool:
    """The predicate: the same crash key, or flagged tokens (rate above the clean 0) of the same class."""
    if expected.kind == "crash":
        return outcome.crash_key == expected.crash_key and (outcome.at_start or not expected.at_start)
    if expected.kind == "batch_invariance":
        return outcome.crash_key is None and outcome.num_requests >= MIN_BATCH and bool(outcome.differing)
    return outcome.crash_key is None and outcome.num_flagged > 0 and outcome.request_class in SAME_CLASS[expected.request_class]


def crash_outcome(exc: BaseException) -> Outcome:
    """An exception as an outcome, keyed the way rollout_lab.crash keys a run's crash."""
    from rollout_lab.crash import crash_signature

    signature = crash_signature(exc)
    return Outcome(crash_key=signature.key, crash_message=signature.message)


def start_engine(case: Case, with_fault: bool):
    """A vllm.LLM for the case, in this process, with the case's planted fault installed."""
    # Read when vLLM is imported and when the engine starts: keep the engine core in-process, so
    # collective_rpc can hand it a plain function.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    llm = engine.start(model=case.model, **case.engine_args)
    if with_fault and case.fault is not None:
        engine.install_fault(llm, case.fault, case.fault_params)
    return llm


def sample(llm, case: Case) -> list[engine.SampledOutput]:
    """vLLM's completions for the case's requests, in request order, with sampled-token logprobs; the
    free block queue first moved to the case's block_pool_head, as the RL job moves it before a step."""
    params = [engine.sampling_params(request.seed, n=1, max_tokens=case.max_tokens, temperature=case.temperature,
                                     top_p=case.top_p, top_k=case.top_k, logprobs=0) for request in case.requests]
    pressure.move_pool_head(llm, case.block_pool_head)
    prompts = [request.prompt_token_ids for request in case.requests]
    if not is_scheduled(case.requests):
        return engine.generate(llm, prompts, params)
    # The aborted requests leave no output: the others come back in request order, as from generate.
    return stepping.drive(llm, prompts, params, [r.arrive_step for r in case.requests],
                          [r.abort_step for r in case.requests], "case")[0]


def is_scheduled(requests: list[Request]) -> bool:
    """Whether the requests need the engine stepped (an arrival after step 0 or an abort), not one generate call."""
    return any(r.arrive_step or r.abort_step is not None for r in requests)


def completed(case: Case) -> list[Request]:
    """The requests the case's schedule does not abort: those whose outputs it judges, in order."""
    return [r for r in case.requests if r.abort_step is None]


def run_case(llm, reference, case: Case, expected: Expected, worst: int = 10) -> Outcome:
    """Sample the case on `llm` and, for a mismatch, compare with the reference token by token; for
    batch invariance, run each target request again alone and compare bitwise."""
    try:
        if case.warmup:
            sample(llm, replace(case, requests=case.warmup, max_tokens=case.warmup_max_tokens, warmup=[]))
        outputs = sample(llm, case)
        if expected.kind == "batch_invariance":
            # Each target alone, with no schedule: a request by itself has no one to arrive after.
            alone = [sample(llm, replace(case, requests=[replace(r, arrive_step=0, abort_step=None)]))[0]
                     for r in completed(case)[: expected.targets]]
    except Exception as exc:  # the engine's exception is the result
        return crash_outcome(exc)
    if expected.kind == "batch_invariance":
        return batch_outcome(outputs, alone)
    outcome = Outcome(num_requests=len(outputs))
    if expected.kind == "crash":
        return outcome
    sequences = [(out.prompt_token_ids, out.token_ids) for out in outputs]
    diffs, flagged = [], []
    for index, (out, ref) in enumerate(zip(outputs, reference_logprobs(reference, sequences))):
        preemptions, cached = out.num_preemptions, out.num_cached_tokens
        outcome.num_preempted_requests += compat.was_preempted(preemptions)
        outcome.num_unknown_preemptions += preemptions is None
        request_flagged = False
        for position, (token_id, vllm_logprob, ref_logprob) in enumerate(zip(out.token_ids, out.logprobs, ref)):
            diff = TokenDiff(index, position, token_id, vllm_logprob, ref_logprob, abs(vllm_logprob - ref_logprob), preemptions, cached)
            diffs.append(diff)
            if diff.abs_diff > expected.spike_threshold:
                outcome.num_flagged += 1
                request_flagged = True
        if request_flagged:
            flagged.append((preemptions, cached))
    outcome.num_tokens = len(diffs)
    outcome.max_abs_diff = max((d.abs_diff for d in diffs), default=0.0)
    outcome.request_class = request_class(flagged)
    outcome.worst = sorted(diffs, key=lambda d: -d.abs_diff)[:worst]
    return outcome


# The batch-invariance predicate: each target request's output in the batch against its output alone
# on the same engine, bitwise (sampled tokens and each sampled token's logprob), by
# rollout_lab.invariance.compare, as the invariance command and the hunt's oracle compare: vLLM's
# promise is bitwise, so any difference counts.
def batch_outcome(batch: list, alone: list, worst: int = 10) -> Outcome:
    """The Outcome of a batch run (RequestOutputs in request order) against each of the first
    len(alone) requests run alone (one RequestOutput each, in the same order)."""
    outcome = Outcome(num_requests=len(batch), targets=len(alone))
    diffs, firsts = [], []
    for index, (in_batch, by_itself) in enumerate(zip(batch, alone)):
        ours, theirs = output_of(in_batch), output_of(by_itself)
        comparison = compare(theirs, ours, "in batch", "as sampled", index)
        outcome.num_tokens += comparison.compared
        if comparison.identical:
            continue
        outcome.differing.append(index)
        if comparison.first_token_diff is not None:
            firsts.append(comparison.first_token_diff)
        # Positions before the first other token hold the same token in both: their logprobs compare.
        same = comparison.compared - (comparison.first_token_diff is not None)
        for position in range(same):
            a, b = ours.logprobs[position], theirs.logprobs[position]
            if a != b:
                outcome.num_flagged += 1
                diffs.append(TokenDiff(index, position, ours.tokens[position], a, b, abs(a - b), None,
                                       int(in_batch.num_cached_tokens or 0)))
        outcome.max_abs_diff = max(outcome.max_abs_diff, comparison.max_abs_diff)
    outcome.first_token_diff = min(firsts, default=None)
    outcome.worst = sorted(diffs, key=lambda d: -d.abs_diff)[:worst]
    return outcome


def environment() -> dict[str, str]:
    """Versions and hardware a bug report needs."""
    import torch
    import transformers
    import vllm

    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": f"{cpu} ({os.cpu_count()} logical cores)",
        "gpu": gpu,
    }
