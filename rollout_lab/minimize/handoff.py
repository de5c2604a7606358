"""The files another process hands the minimizer, and the one it hands back: their records, readers and writers.

    findings/<name>/case.json   CaseFile: a failing case (the hunt writes it; predicate.load_case reads it)
    <out>/<name>/minimized.json MinimizedResult: the minimal case's knobs and sizes (__main__ writes it; the hunt reads it)
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from rollout_lab.config import ConfigError, fault_params
from rollout_lab.minimize.standalone import Case, Expected, Request


class HandoffError(ValueError):
    """A case.json or minimized.json its reader cannot take; the message names the file."""


def case_from_json(data: dict) -> Case:
    """A Case from its asdict() form."""
    return Case(**(data | {"requests": [Request(**r) for r in data["requests"]],
                           "warmup": [Request(**r) for r in data.get("warmup", [])]}))


@dataclass
class CaseFile:
    """A failing case to minimize: the case, the failure to keep, one line on where it came from."""

    # An embedded model name (resolved where the minimizer runs) or a path; case.model is the same.
    model: str
    case: Case
    expected: Expected
    description: str = "a failing case"

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def read(cls, path: Path) -> "CaseFile":
        try:
            data = json.loads(Path(path).read_text())
            case_file = cls(data["model"], case_from_json(data["case"]), Expected(**data["expected"]),
                            data.get("description", "a failing case"))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise HandoffError(f"{path} is not a case file: {type(exc).__name__}: {exc}") from None
        try:
            case_file.expected.oracle  # the failure to keep names a registered oracle
        except KeyError as exc:
            raise HandoffError(f"{path}: {exc.args[0]}") from None
        if case_file.case.fault is not None:
            try:
                fault_params(case_file.case.fault, case_file.case.fault_params)
            except ConfigError as exc:
                raise HandoffError(f"{path}: {exc}") from None
        return case_file


@dataclass
class MinimizedResult:
    """What a minimization ended with (minimized.json)."""

    engine_args: dict  # of the emitted case
    knobs: list[str]  # the knobs that stayed off their defaults: what switches the failure on
    before: str  # sizes, in words
    after: str
    runs: int
    seconds: float
    # Accepted reductions stepped back because the minimal case passed in a fresh process (None: not checked).
    steps_back: Optional[int] = None
    # What `python repro.py` needs here: the lab's copy of a model the script does not rebuild.
    verify_args: list[str] = field(default_factory=list)
    # The vLLM environment variables of the emitted case (the reduction keeps them as they were).
    env: dict[str, str] = field(default_factory=dict)
    # Where the emitted case starts the free block queue (Case.block_pool_head; None: a fresh engine's order).
    block_pool_head: Optional[float] = None
    # Requests the emitted case runs first (Case.warmup): the engine's history the failure needs.
    warmup_requests: int = 0
    # The triage hint given up (reduce.Reduction.class_note; "" where the finding's class reproduced).
    class_note: str = ""

    FILE = "minimized.json"

    def write(self, out_dir: Path) -> Path:
        path = out_dir / self.FILE
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def from_json(cls, data: dict) -> "MinimizedResult":
        return cls(**data)

    @classmethod
    def read(cls, out_dir: Path) -> "MinimizedResult":
        path = out_dir / cls.FILE
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise HandoffError(f"{path} is not a minimization result: {type(exc).__name__}: {exc}") from None
