"""The reference oracle: |vLLM logprob - transformers float32 teacher-forced logprob| of each sampled token."""
from __future__ import annotations

from rollout_lab.oracles.base import Expected, Oracle, Replay, Trial, register
from rollout_lab.oracles.records import SAME_CLASS, Outcome, OracleVerdict, token_outcome, token_verdict

# What each request class (records.request_class) means, in the predicate's words.
WHERE = {
    "preempted": "every flagged request preempted, or reusing a preempted one's KV through the prefix cache",
    "prefix_cached": "every flagged request a prefix-cache hit, none preempted",
    "any": "flagged requests neither needing a preemption nor, in the run, a prefix-cache hit",
}


class Reference(Oracle):
    name = "reference"
    # A minimization's Expected names it "mismatch" (the RL run's failure, minimize/predicate.py).
    aliases = ("mismatch",)
    order = 0  # it speaks for the sampled tokens; the others only when it passed them
    needs_reference = True

    def tolerance(self, oracles, row: str) -> float:
        return float(oracles.reference_tolerance[row])

    def measure(self, trial: Trial) -> OracleVerdict:
        return token_verdict(trial.items, [item.reference for item in trial.items], trial.tolerances[self.name])

    def expected(self, finding, tolerance: float) -> Expected:
        return Expected("mismatch", tolerance, request_class=finding.result.oracles[self.name].request_class or "any")

    def judge(self, replay: Replay, expected: Expected) -> Outcome:
        from rollout_lab.reference import reference_logprobs

        sequences = [(out.prompt_token_ids, out.token_ids) for out in replay.outputs]
        return token_outcome(replay.outputs, reference_logprobs(replay.reference, sequences), expected.spike_threshold,
                             replay.worst)

    def same_failure(self, expected: Expected, outcome: Outcome) -> bool:
        return outcome.crash_key is None and outcome.num_flagged > 0 and outcome.request_class in SAME_CLASS[expected.request_class]

    def describe(self, expected: Expected) -> str:
        return (f"at least one token with |vLLM - transformers float32| logprob > {expected.spike_threshold:g}, "
                f"request class '{expected.request_class}' ({WHERE[expected.request_class]})")

    def console(self, verdict: OracleVerdict) -> str:
        return f"max |ref| {verdict.max_diff:.2g}"


register(Reference())
