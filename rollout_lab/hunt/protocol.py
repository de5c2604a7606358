"""The hunt's records, and the files that carry them between its processes (JSON only at the edges).

    runner process --TrialEvent, one JSON line each (lines/group_NNNN.jsonl)--> driver
    TrialResult (its OracleVerdicts) -> Signature (the dedup key) -> Finding (hunt.db, store.py)
    repro/<name>/signature.txt (a known bug) --read_known_bugs--> driver
The case handed to the minimizer and what it hands back are minimize/handoff.py's CaseFile and
MinimizedResult.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

from rollout_lab.crash import CrashSignature
from rollout_lab.minimize.handoff import MinimizedResult, case_from_json
from rollout_lab.minimize.standalone import Case
from rollout_lab.oracles import trial_oracles
from rollout_lab.oracles.records import SAME_CLASS, OracleVerdict, WorstToken  # noqa: F401 (TrialResult's parts)
# The file in repro/<name>/ that makes its bug known to the hunt.
SIGNATURE_FILE = "signature.txt"


class ProtocolError(ValueError):
    """A hunt file or line that is not what its reader expects; the message names it."""


@dataclass(frozen=True)
class Signature:
    """The dedup key of a failing trial. A crash: its exception type and innermost vLLM frames; a
    hang or a dead engine process: where (trial / engine_start) and the model; a mismatch: the
    oracle that flagged it, the model, the dtype and the class of the flagged requests."""

    kind: str  # crash / hang / died / mismatch
    crash_key: str = ""
    phase: str = ""
    oracle: str = ""
    model: str = ""
    dtype: str = ""
    request_class: str = ""

    def __str__(self) -> str:
        if self.kind == "crash":
            return self.crash_key
        if self.kind in ("hang", "died"):
            return f"{self.kind}@{self.phase}:{self.model}"
        return f"mismatch/{self.oracle}:{self.model}:{self.dtype}:{self.request_class}"

    @classmethod
    def parse(cls, text: str) -> "Signature":
        """The inverse of str(); ProtocolError for a string no signature prints."""
        kind, _, rest = text.partition("@")
        if kind in ("hang", "died") and ":" in rest:
            phase, model = rest.split(":", 1)
            return cls(kind, phase=phase, model=model)
        if text.startswith("mismatch/") and text.count(":") >= 3:
            oracle, rest = text.removeprefix("mismatch/").split(":", 1)
            model, dtype, klass = rest.rsplit(":", 2)
            return cls("mismatch", oracle=oracle, model=model, dtype=dtype, request_class=klass)
        try:
            return cls("crash", crash_key=CrashSignature.parse(text).key)
        except ValueError:
            raise ProtocolError(f"{text!r} is not a hunt signature (Type@frames, hang@phase:model, "
                                f"died@phase:model or mismatch/oracle:model:dtype:class)") from None

    @classmethod
    def mismatch(cls, oracle: str, model: str, dtype: str, request_class: Optional[str]) -> "Signature":
        """A mismatch's key, its request class as the minimizer will judge it."""
        # The minimizer counts flagged prefix-cache hits as the same failure as flagged ordinary
        # requests (oracles.records.SAME_CLASS): one fault hitting whichever requests hold a bad block is
        # one finding, not one per class of the requests it happened to land on.
        klass = request_class or "any"
        return cls("mismatch", oracle=oracle, model=model, dtype=dtype,
                   request_class="any" if klass in SAME_CLASS["any"] else klass)


@dataclass
class TrialResult:
    """One trial's outcome, from the runner (or the driver, for a hang or a dead process)."""

    status: str  # ok / fail / crash / rejected / hang / died / harness_error
    seconds: float = 0.0
    dtype: Optional[str] = None
    oracles: dict[str, OracleVerdict] = field(default_factory=dict)
    num_requests: int = 0
    num_aborted: int = 0
    num_tokens: int = 0
    preempted_requests: int = 0
    cached_requests: int = 0
    batch: bool = True
    phase_seconds: dict[str, float] = field(default_factory=dict)
    # A failing trial's requests as a minimizer case (the model by its hunt name, no fault).
    case: Optional[Case] = None
    crash: Optional[CrashSignature] = None
    # Where a hang or a dead process happened: trial / engine_start.
    phase: str = "trial"
    # Why vLLM rejected it, or how the process died.
    message: str = ""

    @property
    def failed_oracles(self) -> list[str]:
        """The oracles that failed the trial, in the order its signature is keyed by (Oracle.order)."""
        return [o.name for o in trial_oracles() if o.name in self.oracles and o.flagged(self.oracles[o.name])]

    def first_flagged(self) -> str:
        """The oracle a failing trial's signature names: the first (by Oracle.order) that flagged."""
        return self.failed_oracles[0]

    def signature(self, engine: dict) -> Optional[Signature]:
        """The dedup key of a failing trial on `engine` (an engine point); None for one that did not fail."""
        model = str(engine.get("model"))
        if self.status == "crash":
            return Signature("crash", crash_key=self.crash.key)
        if self.status in ("hang", "died"):
            return Signature(self.status, phase=self.phase, model=model)
        if self.status != "fail":
            return None
        oracle = self.first_flagged()
        return Signature.mismatch(oracle, model, str(engine.get("engine.dtype", "auto")), self.oracles[oracle].request_class)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "TrialResult":
        data = dict(data)
        data["oracles"] = {name: OracleVerdict.from_json(v) for name, v in data.get("oracles", {}).items()}
        data["case"] = case_from_json(data["case"]) if data.get("case") else None
        data["crash"] = CrashSignature.from_dict(data["crash"]) if data.get("crash") else None
        return cls(**data)


# The events of a group's lines file, one JSON line each: {"event": <tag>, "group": <key>, ...}.
@dataclass
class EngineStarting:
    """The runner process is up and starts the engine with these vllm.LLM arguments."""

    group: str
    args: dict


@dataclass
class EngineStarted:
    """The engine start's outcome: ok, rejected (vLLM's validation) or crash."""

    group: str
    status: str
    seconds: float
    dtype: Optional[str] = None
    num_blocks: Optional[int] = None
    crash: Optional[CrashSignature] = None
    message: str = ""


@dataclass
class TrialStarted:
    group: str
    trial: str


@dataclass
class Heartbeat:
    """Engine steps (and reference batches) so far: the driver calls a trial hung only when they stop rising."""

    group: str
    steps: int


@dataclass
class TrialFinished:
    group: str
    trial: str
    point: dict  # the workload point
    result: TrialResult


@dataclass
class OutOfTime:
    """The hunt's budget ran out: the group stopped before starting trial `next_trial`."""

    group: str
    next_trial: str


TrialEvent = Union[EngineStarting, EngineStarted, TrialStarted, Heartbeat, TrialFinished, OutOfTime]
EVENT_TAGS = {EngineStarting: "engine_start", EngineStarted: "engine", TrialStarted: "start", Heartbeat: "beat",
              TrialFinished: "result", OutOfTime: "out_of_time"}
EVENT_TYPES = {tag: cls for cls, tag in EVENT_TAGS.items()}


def event_line(event: TrialEvent) -> str:
    """One event as its line in a lines file (newline included)."""
    return json.dumps({"event": EVENT_TAGS[type(event)]} | asdict(event), default=str) + "\n"


def parse_event(line: bytes | str) -> TrialEvent:
    """The inverse of event_line; ProtocolError for a line that is no event."""
    try:
        data = json.loads(line)
        cls = EVENT_TYPES[data.pop("event")]
        if "result" in data:
            data["result"] = TrialResult.from_json(data["result"])
        if data.get("crash"):
            data["crash"] = CrashSignature.from_dict(data["crash"])
        return cls(**data)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ProtocolError(f"not a hunt event line ({type(exc).__name__}: {exc}): {line[:200]!r}") from None


def read_events(path: Path, offset: int) -> tuple[list[TrialEvent], int]:
    """The complete lines of `path` from byte `offset`, as events; (events, new offset). A line cut
    short (a killed process) is not complete: it is left for the next read."""
    if not path.exists():
        return [], offset
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    return [parse_event(line) for line in data[:end].splitlines() if line.strip()], offset + end


@dataclass
class Finding:
    """One distinct signature: where it was first seen, what became of it."""

    signature: Signature
    first_trial: str
    first_elapsed: float
    first_trial_number: int
    trials: int
    # The smallest failing trial seen (the minimizer starts from it): engine and workload points, result.
    engine: dict
    workload: dict
    result: TrialResult
    # new / minimized / verified / flaky / not_minimized / no_repro / known / duplicate
    state: str = "new"
    # The knobs that switch it on (from the minimizer), the planted fault when it needs it.
    trigger: Optional[list[str]] = None
    # Its repro.py: relative to the hunt dir for a repro this hunt wrote (repro/<name>/repro.py);
    # for a known bug, as hunt.known_repros names its folder (relative to the repo).
    repro: Optional[str] = None
    repro_rate: Optional[str] = None  # "k/n" standalone runs that reproduced
    why: str = ""  # why it was not minimized, or why the minimizer gave up
    duplicate_of: Optional[str] = None  # the minimized finding whose trigger holds in its engine
    needs_planted_fault: bool = False
    minimized: Optional[MinimizedResult] = None
    verify_exits: list[int] = field(default_factory=list)
    no_fault_exit: Optional[int] = None  # the repro's exit with the planted fault off

    @property
    def kind(self) -> str:
        return self.signature.kind

    @property
    def model(self) -> str:
        return str(self.engine.get("model"))

    @property
    def dtype(self) -> str:
        return str(self.engine.get("engine.dtype", "auto"))

    def to_json(self) -> dict:
        return asdict(self) | {"signature": str(self.signature)}

    @classmethod
    def from_json(cls, data: dict) -> "Finding":
        minimized = data.get("minimized")
        return cls(**(data | {"signature": Signature.parse(data["signature"]), "result": TrialResult.from_json(data["result"]),
                              "minimized": MinimizedResult.from_json(minimized) if minimized else None}))


def write_known_bug(folder: Path, signature: Signature) -> Path:
    """Mark repro/<name>/ (folder) as the repro of the bug with this signature; the file's path."""
    path = folder / SIGNATURE_FILE
    path.write_text(f"{signature}\n")
    return path


def read_known_bugs(folder: Optional[Path]) -> dict[Signature, Path]:
    """Signature -> repro.py of each known bug in `folder`: every <name>/ holding a signature.txt
    beside its repro.py. Only crashes: a crash key names its site, a mismatch signature no knob."""
    if folder is None or not folder.is_dir():
        return {}
    known = {}
    for path in sorted(folder.glob(f"*/{SIGNATURE_FILE}")):
        try:
            signature = Signature.parse(path.read_text().strip())
        except ProtocolError as exc:
            raise ProtocolError(f"{path}: {exc}") from None
        if signature.kind != "crash":
            raise ProtocolError(f"{path}: {signature} is not a crash signature; only crashes are known bugs")
        if not (path.parent / "repro.py").is_file():
            raise ProtocolError(f"{path}: no repro.py beside it")
        known[signature] = path.parent / "repro.py"
    return known
