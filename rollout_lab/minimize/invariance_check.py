"""The minimizer's batch-invariance predicate: each target request's output in the batch against its
output alone on the same engine, bitwise (the sampled tokens and each sampled token's logprob).

    Case -> the whole batch (one generate call) -> each of the first k requests alone -> batch_outcome

The comparison is rollout_lab.invariance.compare, the same one the invariance command and the hunt's
batch-invariance oracle use: vLLM's promise is bitwise, so any difference counts.
"""
from __future__ import annotations

from rollout_lab.invariance import compare, output_of
from rollout_lab.minimize.standalone import Outcome, TokenDiff

# Requests a case needs to be a batch: with one, "alone" and "in the batch" are the same run twice.
MIN_BATCH = 2


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
