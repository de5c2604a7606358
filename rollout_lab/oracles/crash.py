"""The crash oracle: an exception from the engine, keyed like rollout_lab.crash (type @ innermost vLLM frames)."""
from __future__ import annotations

from rollout_lab.oracles.base import Expected, Oracle, Replay, register
from rollout_lab.oracles.records import Outcome


class Crash(Oracle):
    name = "crash"
    signature_kind = "crash"

    def expected(self, finding, tolerance: float) -> Expected:
        # The driver records an engine that crashed while starting as a trial of phase engine_start.
        return Expected(self.name, tolerance, crash_key=finding.signature.crash_key,
                        at_start=finding.result.phase == "engine_start")

    def judge(self, replay: Replay, expected: Expected) -> Outcome:
        return Outcome(num_requests=len(replay.outputs))  # it ran to the end: no crash

    def same_failure(self, expected: Expected, outcome: Outcome) -> bool:
        return outcome.crash_key == expected.crash_key and (outcome.at_start or not expected.at_start)

    def describe(self, expected: Expected) -> str:
        return f"a crash with key {expected.crash_key}" + (" while the engine starts" if expected.at_start else "")


register(Crash())
