"""The batch-invariance oracle: a request of the batch sampled again alone on the same engine, compared
bitwise (sampled tokens and each sampled token's logprob) by rollout_lab.invariance.compare, as the
invariance command compares: vLLM's promise (VLLM_BATCH_INVARIANT=1 on a supported GPU) is bitwise.
Where nothing is promised the hunt measures the noise floor with it, never a failure."""
from __future__ import annotations

import os

from rollout_lab.oracles.base import Expected, Oracle, Replay, Trial, register
from rollout_lab.oracles.records import MIN_BATCH, Outcome, OracleVerdict, TokenDiff


class BatchInvariance(Oracle):
    name = "batch_invariance"
    order = 2
    min_requests = MIN_BATCH  # with one request, "alone" and "in the batch" are the same run twice
    moves_pool_head = True  # its repro runs the batch, then each target alone

    def measure(self, trial: Trial) -> OracleVerdict:
        """On a trial of more than one request: a failure only where vLLM promises invariance; elsewhere
        the noise floor, measured only while `trial.measure_floor` (once an engine: it cannot fail)."""
        from rollout_lab.hunt.batch_oracle import batch_oracle
        from rollout_lab.invariance import promises_invariance

        promised = promises_invariance(os.environ.get("VLLM_BATCH_INVARIANT") == "1")
        if len(trial.sampled) < 2 or not (promised or trial.measure_floor):
            return batch_oracle(trial.llm, [], False)
        # Where nothing is promised one request measures the noise floor; decoding alone is costly.
        return batch_oracle(trial.llm, trial.sampled, promised, limit=4 if promised else 1)

    def expected(self, finding, tolerance: float) -> Expected:
        # Bitwise, as promised; the targets are the requests the oracle ran alone (the first ones).
        return Expected(self.name, 0.0, targets=finding.result.oracles[self.name].requests)

    def rerun(self, sample, case, expected: Expected) -> list:
        from dataclasses import replace

        from rollout_lab.minimize.standalone import completed

        # Each target alone, with no schedule: a request by itself has no one to arrive after.
        return [sample([replace(r, arrive_step=0, abort_step=None)])[0] for r in completed(case)[: expected.targets]]

    def judge(self, replay: Replay, expected: Expected) -> Outcome:
        return batch_outcome(replay.outputs, replay.reruns, replay.worst)

    def same_failure(self, expected: Expected, outcome: Outcome) -> bool:
        return outcome.crash_key is None and outcome.num_requests >= MIN_BATCH and bool(outcome.differing)

    def describe(self, expected: Expected) -> str:
        return (f"one of the first {expected.targets} requests, run again alone on the same engine after the whole "
                f"batch, gives other sampled tokens or sampled-token logprobs (bitwise) than in the batch")

    def repro_check(self, case, expected: Expected, model: str, install: str) -> str:
        from rollout_lab.minimize.script_run import batch_run

        return batch_run(case, expected, model, install)

    def report_symptom(self, expected: Expected, case) -> str:
        env = " ".join(f"{k}={v}" for k, v in sorted(case.env.items()))
        return f"{env}: logprobs depend on the batch" if env else "a request's logprobs depend on its batch"

    def report_happened(self, expected: Expected, case, outcome) -> str:
        env = f"with {' '.join(f'{k}={v}' for k, v in sorted(case.env.items()))}, " if case.env else ""
        happened = (f"{env}a request run again alone on the same engine, after the whole batch, returns other sampled "
                    "tokens or sampled-token logprobs (compared bitwise) than it did inside the batch")
        return happened + (f": {outcome.describe()}" if outcome is not None else "")

    def report_where(self, expected: Expected, outcome: Outcome) -> list[str]:
        text = (f"- Minimal case: target requests {outcome.differing} of the first {outcome.targets} differ; "
                f"{outcome.num_flagged}/{outcome.num_tokens} compared positions hold the same token with another logprob")
        if outcome.worst:
            text += f", worst {outcome.worst[0].abs_diff:.3g} (request {outcome.worst[0].request}, position {outcome.worst[0].position})"
        if outcome.first_token_diff is not None:
            text += f"; first other token at position {outcome.first_token_diff}"
        return [text + "."]

    def report_expected_actual(self, expected: Expected, case, outcome) -> tuple[str, str]:
        return ("each target request gives bitwise the same tokens and logprobs alone as inside the batch "
                "(vLLM's batch-invariance promise).", (outcome.describe() if outcome is not None else "they differ") + ".")

    def report_query(self, expected: Expected, case, knobs: tuple) -> str:
        from rollout_lab.minimize.bug_report import search_query

        return search_query("VLLM_BATCH_INVARIANT", "logprobs", tuple(sorted(set(case.env) - {"VLLM_BATCH_INVARIANT"})))

    def console(self, verdict: OracleVerdict) -> str:
        return f"batch vs alone {verdict.identical}/{verdict.requests} identical" if verdict.requests else ""


def batch_outcome(batch: list, alone: list, worst: int = 10) -> Outcome:
    """The Outcome of a batch run (RequestOutputs in request order) against each of the first
    len(alone) requests run alone (one RequestOutput each, in the same order)."""
    from rollout_lab.invariance import compare, output_of

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


register(BatchInvariance())
