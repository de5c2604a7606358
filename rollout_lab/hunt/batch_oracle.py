"""The hunt's batch-invariance oracle: requests of a trial run again alone, compared bitwise (invariance.compare)."""
from __future__ import annotations

from rollout_lab import engine as engines
from rollout_lab.oracles.records import OracleVerdict
from rollout_lab.invariance import Output, compare, output_of


def batch_oracle(llm, sampled: list[tuple[list[int], object, Output]], promised: bool, limit: int = 4) -> OracleVerdict:
    """The hunt's batch-invariance oracle: up to `limit` requests of a trial whose sampling does
    not depend on an RNG stream shared with the batch (greedy, or a seed of their own), each run
    again alone with its own SamplingParams and compared bitwise with what it gave in the batch.
    `sampled` holds (prompt ids, SamplingParams, in-batch output). A difference is a failure only
    where vLLM promises invariance; elsewhere it is the noise floor, kept as `max_diff`."""
    chosen = [(p, q, o) for p, q, o in sampled if q.n == 1 and (q.temperature == 0.0 or q.seed is not None)][:limit]
    comparisons = [compare(o, output_of(engines.generate(llm, [p], [q])[0]), "alone", "greedy" if q.temperature == 0.0 else "seeded", i)
                   for i, (p, q, o) in enumerate(chosen)]
    differing = [c for c in comparisons if not c.identical]
    return OracleVerdict(
        tokens=sum(c.compared for c in comparisons),
        flagged=len(differing) if promised else 0,
        max_diff=max((c.max_abs_diff for c in comparisons), default=0.0),
        # As the other oracles' verdicts (runner.judge): the hunt keys findings by class.
        request_class="any" if promised and differing else None,
        requests=len(comparisons),
        identical=len(comparisons) - len(differing),
        promised=promised,
        first_token_diff=min((c.first_token_diff for c in differing if c.first_token_diff is not None), default=None),
    )
