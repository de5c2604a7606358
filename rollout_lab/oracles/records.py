"""What the oracles hand out: a trial's verdict (the hunt) and a replay's outcome (the minimizer).

    hunt trial  -> Oracle.measure -> OracleVerdict (TrialResult.oracles, hunt.db)
    replay      -> Oracle.judge   -> Outcome (the minimizer's reduction.jsonl) -> Oracle.same_failure
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from rollout_lab import compat

# Requests a case needs to be a batch: with one, "alone" and "in the batch" are the same run twice.
MIN_BATCH = 2


@dataclass
class WorstToken:
    """The token an oracle found furthest off."""

    diff: float
    request: int
    position: int
    token_id: int


@dataclass
class OracleVerdict:
    """What one oracle said about one trial."""

    tokens: int = 0
    flagged: int = 0
    max_diff: float = 0.0
    request_class: Optional[str] = None  # of the flagged requests (request_class below)
    worst: Optional[WorstToken] = None
    # The batch-invariance oracle's: requests run again alone, how many came back bitwise identical,
    # whether vLLM promised invariance, the first differing token position.
    requests: int = 0
    identical: int = 0
    promised: bool = False
    first_token_diff: Optional[int] = None

    @classmethod
    def from_json(cls, data: dict) -> "OracleVerdict":
        worst = data.get("worst")
        return cls(**(data | {"worst": WorstToken(**worst) if worst else None}))


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


def token_outcome(outputs: list, other: list[list[float]], tolerance: float, worst: int = 10) -> Outcome:
    """Sampled outputs (engine.SampledOutput, request order) against another logprob per sampled
    token (`other`, one list per output): flagged tokens above `tolerance`, their class, the worst ones."""
    outcome = Outcome(num_requests=len(outputs))
    diffs, flagged = [], []
    for index, (out, ref) in enumerate(zip(outputs, other)):
        preemptions, cached = out.num_preemptions, out.num_cached_tokens
        outcome.num_preempted_requests += compat.was_preempted(preemptions)
        outcome.num_unknown_preemptions += preemptions is None
        request_flagged = False
        for position, (token_id, vllm_logprob, ref_logprob) in enumerate(zip(out.token_ids, out.logprobs, ref)):
            diff = TokenDiff(index, position, token_id, vllm_logprob, ref_logprob, abs(vllm_logprob - ref_logprob), preemptions, cached)
            diffs.append(diff)
            if diff.abs_diff > tolerance:
                outcome.num_flagged += 1
                request_flagged = True
        if request_flagged:
            flagged.append((preemptions, cached))
    outcome.num_tokens = len(diffs)
    outcome.max_abs_diff = max((d.abs_diff for d in diffs), default=0.0)
    outcome.request_class = request_class(flagged)
    outcome.worst = sorted(diffs, key=lambda d: -d.abs_diff)[:worst]
    return outcome


def token_verdict(items: list, others: list[list[float]], tolerance: float) -> OracleVerdict:
    """A trial's sampled completions (each with logprobs, num_preemptions, num_cached_tokens,
    request, token_ids) against another logprob per sampled token (`others`, one list per item;
    an empty list: that item was not checked): flagged counts, max, class, the worst token."""
    flagged_requests, flagged, worst, num = [], 0, None, 0
    for item, other in zip(items, others):
        if not other:
            continue
        diffs = [abs(a - b) for a, b in zip(item.logprobs, other)]
        num += len(diffs)
        hits = [d for d in diffs if d > tolerance]
        if hits:
            flagged += len(hits)
            flagged_requests.append((item.num_preemptions, item.num_cached_tokens))  # None: unknown, as recorded
        for p, d in enumerate(diffs):
            if worst is None or d > worst.diff:
                worst = WorstToken(d, item.request, p, item.token_ids[p])
    return OracleVerdict(num, flagged, worst.diff if worst else 0.0, request_class(flagged_requests), worst)
