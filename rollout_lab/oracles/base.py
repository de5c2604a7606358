"""The oracle interface and its registry.

An oracle is one check of vLLM. It says what it measures on a hunt trial (`measure` -> OracleVerdict)
and on a minimizer replay (`rerun`, `judge` -> Outcome), its tolerance row (`tolerance`), what
counts as the same failure (`expected`, `same_failure`, `describe`) and how the hunt reports it
(`console`). The hunt, the minimizer's predicate, the emitted repro and the reports look an oracle
up here by name (`get`), never compare its name. Adding one: docs/oracles.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from rollout_lab.oracles.records import Outcome, OracleVerdict


@dataclass
class Expected:
    """The failure a minimization keeps: what `oracle` (by its registered name) must show again.
    A crash: the same crash key; a mismatch: flagged tokens on the same class of requests; batch
    invariance: a target request whose output alone differs bitwise from its output in the batch."""

    kind: str  # the oracle's registered name: "crash", "mismatch", "batch_invariance", ...
    spike_threshold: float
    crash_key: Optional[str] = None
    request_class: Optional[str] = None
    # batch_invariance: the first `targets` requests are each run again alone and compared.
    targets: Optional[int] = None
    # crash: vLLM raised it while the engine started, so no request ever ran and only engine knobs
    # can matter (the minimizer reduces those alone; the crash must come at start again).
    at_start: bool = False

    @property
    def oracle(self) -> "Oracle":
        return get(self.kind)

    def describe(self) -> str:
        return self.oracle.describe(self)


@dataclass
class Trial:
    """What a hunt trial shows its oracles (built by hunt/runner.run_trial)."""

    llm: Any
    # The sampled completions (runner.Scored: logprobs, num_preemptions, num_cached_tokens, and the
    # reference's and the re-scoring's logprob per token where those ran).
    items: list
    # Each oracle's bound for this engine's tolerance row (its `tolerance`), by oracle name.
    tolerances: dict[str, float]
    # The first completion of each request as (prompt ids, SamplingParams, invariance.Output).
    sampled: list = field(default_factory=list)
    # Whether the batch-composition noise floor is still to be measured on this engine.
    measure_floor: bool = True


@dataclass
class Replay:
    """One replay of a minimizer case (standalone.run_case): its outputs and what the oracle asked for."""

    case: Any  # standalone.Case
    outputs: list  # engine.SampledOutput of case.requests, in order
    reruns: list  # what the oracle's `rerun` sampled
    reference: Any = None  # the float32 transformers model, when the oracle `needs_reference`
    worst: int = 10  # the worst tokens an Outcome keeps


class Oracle:
    """One check; subclass it, set `name`, override what differs, `register` an instance."""

    # The registry key: Expected.kind, TrialResult.oracles' key, a mismatch Signature's oracle.
    name: str = ""
    # Other names it is found by (a name stored in older case files).
    aliases: tuple[str, ...] = ()
    # How the hunt keys a trial this oracle fails: "mismatch" (a Signature naming the oracle) or the
    # oracle's own name for the outcomes that end a trial (crash, hang, died).
    signature_kind: str = "mismatch"
    # Which TrialResult.first_flagged names when several flag one trial: the lowest first.
    order: int = 100
    # The float32 reference model a replay needs loaded before the engine starts.
    needs_reference: bool = False
    # Requests a case needs before this oracle's predicate can hold (a reducer skips smaller ones).
    min_requests: int = 1
    # Its failure is an exception: the repro.py's `except` clause is its verdict (script_run.exception_block).
    raises: bool = False
    # Its repro check runs the case more than once and moves the free block queue before each run itself.
    moves_pool_head: bool = False
    # A verified repro of it marks its folder as a known bug (protocol.write_known_bug): only a crash's
    # signature names its site; a mismatch's names no knob.
    known_bug: bool = False

    def tolerance(self, oracles: Any, row: str) -> float:
        """Its bound for an engine of tolerance row `row` (tolerances.oracle_row), from the hunt's OracleConfig."""
        return 0.0

    def measure(self, trial: Trial) -> Optional[OracleVerdict]:
        """Its verdict on a hunt trial's outputs; None: it judges no trial's outputs (a crash or a hang ends the trial)."""
        return None

    def flagged(self, verdict: OracleVerdict) -> bool:
        """Whether `verdict` fails the trial."""
        return verdict.flagged > 0

    def why_not_minimized(self) -> Optional[str]:
        """Why the minimizer cannot replay what this oracle flags (None: it can)."""
        return None

    def expected(self, finding: Any, tolerance: float) -> Expected:
        """The failure a minimization of the hunt's `finding` (protocol.Finding) keeps."""
        verdict = finding.result.oracles[self.name]
        return Expected(self.name, tolerance, request_class=verdict.request_class or "any")

    def rerun(self, sample: Callable[[list], list], case: Any, expected: Expected) -> list:
        """Engine runs a replay needs beyond the case itself (`sample(requests)` samples them on the same engine)."""
        return []

    def judge(self, replay: Replay, expected: Expected) -> Outcome:
        """What one replay showed, for `same_failure`."""
        return Outcome(num_requests=len(replay.outputs))

    def same_failure(self, expected: Expected, outcome: Outcome) -> bool:
        """The minimizer's predicate: the replay shows the failure `expected` describes."""
        return False

    def describe(self, expected: Expected) -> str:
        """The predicate in a sentence (MINIMIZATION.md, the minimizer's console)."""
        return self.name

    def repro_check(self, case: Any, expected: Expected, model: str, install: str) -> str:
        """The text of repro.py's `def reproduce(args) -> (verdict, why)`: start vllm.LLM on `model`, run
        `install` (lines after the start), send the case's requests, judge them (helpers: minimize/script_run.py)."""
        raise NotImplementedError(f"oracle {self.name!r} has no repro check: the minimizer cannot emit its repro.py")

    # What REPORT.md says of its failure (minimize/report_text.py lays the words out).
    def report_symptom(self, expected: Expected, case: Any) -> str:
        """The title's few words for the symptom."""
        return f"{self.name} fails"

    def report_happened(self, expected: Expected, case: Any, outcome: Optional[Outcome]) -> str:
        """The description's clause saying what goes wrong (`outcome`: the final case's, if run)."""
        return expected.describe() + (f": {outcome.describe()}" if outcome is not None else "")

    def report_where(self, expected: Expected, outcome: Outcome) -> list[str]:
        """Lines on where the minimal case fails."""
        return [f"- Minimal case: {outcome.describe()}."]

    def report_expected_actual(self, expected: Expected, case: Any, outcome: Optional[Outcome]) -> tuple[str, str]:
        """("Expected", "Actual"), a line each."""
        return (f"no {self.name} failure.", (outcome.describe() if outcome is not None else expected.describe()) + ".")

    def report_query(self, expected: Expected, case: Any, knobs: tuple) -> str:
        """What to search vLLM's issues for (bug_report.search_query)."""
        from rollout_lab.minimize.bug_report import search_query

        return search_query(self.name, "vllm", knobs)

    def console(self, verdict: OracleVerdict) -> str:
        """Its part of the hunt's line for a finished trial."""
        return f"{self.name} {verdict.flagged}/{verdict.tokens} flagged, max {verdict.max_diff:.2g}"


_REGISTRY: dict[str, Oracle] = {}


def register(oracle: Oracle) -> Oracle:
    """Add `oracle` under its name (a second one of that name replaces it); returns it."""
    if not oracle.name:
        raise ValueError(f"{type(oracle).__name__} has no name: set its `name`")
    for name in (oracle.name, *oracle.aliases):
        _REGISTRY[name] = oracle
    return oracle


def unregister(name: str) -> None:
    """Drop the oracle registered as `name`, aliases and all (a test's toy oracle)."""
    oracle = _REGISTRY.get(name)
    for key in [k for k, o in _REGISTRY.items() if o is oracle]:
        del _REGISTRY[key]


def get(name: str) -> Oracle:
    """The oracle registered as `name`; KeyError naming the registered ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no oracle {name!r}; registered: {', '.join(sorted(_REGISTRY))}") from None


def trial_oracles() -> list[Oracle]:
    """The oracles that judge a trial's outputs, in the order a failing trial is keyed by."""
    unique = {id(o): o for o in _REGISTRY.values() if o.signature_kind == "mismatch"}
    return sorted(unique.values(), key=lambda o: (o.order, o.name))


def measure_trial(trial: Trial) -> dict[str, OracleVerdict]:
    """Every registered oracle's verdict on a hunt trial, by name (those that judge no trial's outputs left out)."""
    verdicts = {o.name: o.measure(trial) for o in trial_oracles()}
    return {name: v for name, v in verdicts.items() if v is not None}


def oracle_of(signature: Any) -> Oracle:
    """The oracle behind a hunt Signature: the named one for a mismatch, else the one of its kind."""
    return get(signature.oracle if signature.kind == "mismatch" else signature.kind)
