"""The reference oracle: |vLLM logprob - transformers float32 teacher-forced logprob| of each sampled token."""
from __future__ import annotations

from rollout_lab.oracles.base import Expected, Oracle, Replay, Trial, register
from rollout_lab.oracles.records import SAME_CLASS, Outcome, OracleVerdict, token_outcome, token_verdict

# What each request class (records.request_class) means: in the predicate's words, in a report's, in a title's.
CLASS_PREDICATE = {
    "preempted": "every flagged request preempted, or reusing a preempted one's KV through the prefix cache",
    "prefix_cached": "every flagged request a prefix-cache hit, none preempted",
    "any": "flagged requests neither needing a preemption nor, in the run, a prefix-cache hit",
}
CLASS_REPORT = {
    "preempted": "requests that were preempted and resumed",
    "prefix_cached": "requests with prefix-cache hits",
    "any": "ordinary requests",
}
CLASS_TITLE = {"preempted": "preempted requests", "prefix_cached": "prefix-cache hits", "any": "ordinary requests"}


def _agreement(case) -> str:
    from rollout_lab.tolerances import clean_agreement

    return clean_agreement(str(case.engine_args.get("dtype")), case.engine_args.get("kv_cache_dtype"))


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
                f"request class '{expected.request_class}' ({CLASS_PREDICATE[expected.request_class]})")

    def repro_check(self, case, expected: Expected, model: str, install: str) -> str:
        from rollout_lab.minimize.script_run import mismatch_run

        return mismatch_run(case, expected, model, install)

    def report_symptom(self, expected: Expected, case) -> str:
        return f"logprobs off transformers' on {CLASS_TITLE[expected.request_class]}"

    def report_happened(self, expected: Expected, case, outcome) -> str:
        happened = ("the logprob vLLM returns for some sampled tokens differs from transformers' float32 "
                    f"teacher-forced logprob by more than {expected.spike_threshold:g} ({_agreement(case)}), "
                    f"on {CLASS_REPORT[expected.request_class]}")
        if outcome is not None:
            happened += f": {outcome.num_flagged}/{outcome.num_tokens} tokens, max difference {outcome.max_abs_diff:.3g}"
        return happened

    def report_where(self, expected: Expected, outcome: Outcome) -> list[str]:
        bad = [d for d in outcome.worst if d.abs_diff > expected.spike_threshold]
        if not bad:
            return []
        first = min(bad, key=lambda d: d.position)
        return [f"- Minimal case: {outcome.num_flagged}/{outcome.num_tokens} sampled tokens flagged, on requests "
                f"{sorted({d.request for d in bad})} of {outcome.num_requests} ({outcome.num_preempted_requests} preempted); "
                f"first bad position {first.position} (request {first.request}: {first.num_preemptions} preemptions, "
                f"{first.num_cached_tokens} prefix-cached tokens); max |diff| {outcome.max_abs_diff:.3g}."]

    def report_expected_actual(self, expected: Expected, case, outcome) -> tuple[str, str]:
        return (f"every sampled token's logprob within {expected.spike_threshold:g} of transformers' float32 one "
                f"({_agreement(case)}).", (outcome.describe() if outcome is not None else "some are further off") + ".")

    def report_query(self, expected: Expected, case, knobs: tuple) -> str:
        from rollout_lab.minimize.bug_report import search_query

        return search_query("logprobs", "mismatch", knobs)

    def console(self, verdict: OracleVerdict) -> str:
        return f"max |ref| {verdict.max_diff:.2g}"


register(Reference())
