"""The crash oracle: an exception from the engine, keyed like rollout_lab.crash (type @ innermost vLLM frames)."""
from __future__ import annotations

from rollout_lab.oracles.base import Expected, Oracle, Replay, register
from rollout_lab.oracles.records import Outcome


class Crash(Oracle):
    name = "crash"
    signature_kind = "crash"
    raises = True
    known_bug = True

    def expected(self, finding, tolerance: float) -> Expected:
        # The driver records an engine that crashed while starting as a trial of phase engine_start.
        return Expected(self.name, tolerance, crash_key=finding.signature.crash_key,
                        at_start=finding.result.phase == "engine_start")

    def judge(self, replay: Replay, expected: Expected) -> Outcome:
        return Outcome(num_requests=len(replay.outputs))  # it ran to the end: no crash

    def same_failure(self, expected: Expected, outcome: Outcome) -> bool:
        return outcome.crash_key == expected.crash_key and (outcome.at_start or not expected.at_start)

    def repro_check(self, case, expected: Expected, model: str, install: str) -> str:
        from rollout_lab.minimize.script_run import crash_run

        return crash_run(case, expected, model, install)

    def report_symptom(self, expected: Expected, case) -> str:
        exc_type, site = expected.crash_key.split("@", 1)[0], crash_function(expected.crash_key)
        if expected.at_start:
            return f"engine start raises {exc_type}" + (f" in {site}" if site else "")
        return f"{exc_type} in {site or 'generate'}"

    def report_happened(self, expected: Expected, case, outcome) -> str:
        happened = f"{'vllm.LLM (the engine start)' if expected.at_start else 'llm.generate'} raises {expected.crash_key.split('@', 1)[0]}"
        return happened + (f" ({outcome.crash_message})" if outcome is not None else "")

    def report_where(self, expected: Expected, outcome: Outcome) -> list[str]:
        return [f"- The crash: `{outcome.crash_message}` (key `{expected.crash_key}`)."]

    def report_expected_actual(self, expected: Expected, case, outcome) -> tuple[str, str]:
        message = f": {outcome.crash_message}" if outcome is not None and outcome.crash_message else ""
        where = crash_function(expected.crash_key)
        from rollout_lab.minimize.standalone import completed, is_scheduled

        ran = (f"the engine, stepped on the schedule, finishes the {len(completed(case))} request(s) it does not abort"
               if is_scheduled(case.requests) else f"`llm.generate` returns the {len(case.requests)} completion(s)")
        return (f"{ran}.",
                f"it raises `{expected.crash_key.split('@', 1)[0]}{message}`" + (f" in `{where}`." if where else "."))

    def report_query(self, expected: Expected, case, knobs: tuple) -> str:
        from rollout_lab.minimize.bug_report import search_query

        return search_query(expected.crash_key.split("@", 1)[0], crash_function(expected.crash_key), knobs)

    def describe(self, expected: Expected) -> str:
        return f"a crash with key {expected.crash_key}" + (" while the engine starts" if expected.at_start else "")


def crash_function(crash_key: str) -> str:
    """The innermost vLLM function of a crash key ("" when the crash had no vLLM frame)."""
    frames = crash_key.split("@", 1)[1]
    return "" if frames == "no-vllm-frame" else frames.split("|")[-1].rsplit(":", 1)[-1]


register(Crash())
