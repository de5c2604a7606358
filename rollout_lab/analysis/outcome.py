"""Outcome classes: how each run ended, where a swept variable switches between them, and the words for it.

    clean            no crash, no weight-sync mismatch, no token above the spike threshold
    silent mismatch  tokens above the spike threshold in a run that ended normally
    shifted          no token above it, but the |difference| distribution of some recorded condition
                     moved against the clean profile (or the run itself): rollout_lab/shift.py
    sync mismatch    the weight-sync probe disagreed after a step (the loop stops there)
    crash <key>      the engine raised; keyed by exception type @ innermost vLLM frames
    not run          vLLM refused the configuration at start (its own validation): there is no
                     result, so the run is listed apart and left out of every test

A variable whose values move runs between classes switches the failure on, off or into another
class: the threshold sentence says where ("fails from engine.max_num_seqs >= 8 (clean at 1, 2)")
and the next sweep fills the gap.
"""
from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from rollout_lab.config import RunConfig
from rollout_lab.crash import NO_VLLM_FRAME, CrashSignature

CLEAN, SILENT, SHIFTED, SYNC, CRASH, NOT_RUN = "clean", "silent mismatch", "shifted", "sync mismatch", "crash", "not run"
# Points the next sweep puts between the last value of one class and the first of the next.
NEXT_POINTS = 5


def outcome_class(status: str, num_spikes: int, refused: bool, shifted: bool = False) -> str:
    """The run's class from its summary status, spike count and shift test (refused: vLLM refused its engine)."""
    if refused:
        return NOT_RUN
    if status == "crash":
        return CRASH
    if status == "sync_mismatch":
        return SYNC
    if num_spikes > 0:
        return SILENT
    return SHIFTED if shifted else CLEAN


def outcome_label(outcome: str, crash_key: Optional[str]) -> str:
    """What two runs must share to end alike: the class, and for a crash its site."""
    if outcome != CRASH or not crash_key:
        return outcome
    crash = CrashSignature.parse(crash_key)
    return f"crash {crash.exception_type} at {Path(crash.site).name if crash.site else NO_VLLM_FRAME}"


def vllm_refusal(cfg: RunConfig, crash: CrashSignature) -> Optional[str]:
    """vLLM's reason when it refused the run's engine configuration at start, else None.

    The run only records that the engine raised at start. Whether that was vLLM refusing its
    configuration is asked the hunt's way (engine.validate: EngineArgs'
    create_engine_config and the KV-size check vLLM makes at start); the reason given is the
    one vLLM raised with.
    """
    if crash.phase != "engine_start":
        return None
    from rollout_lab import engine
    from rollout_lab.minimize.predicate import direct_engine_args
    from rollout_lab.models import resolve_model

    try:
        model_path = resolve_model(cfg.model.name)
        complaint = engine.validate(model_path, direct_engine_args(cfg, model_path))
    except Exception:  # the configuration cannot be re-checked here: the start crash stands
        return None
    if complaint is None:
        return None
    return " ".join(f"{crash.exception_type}: {crash.message or complaint}".split())


def fmt_value(value: Any) -> str:
    """A config value as a user types it on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.3g}"
    return "null" if value is None else str(value)


def _values(values: Sequence[Any]) -> str:
    return ", ".join(fmt_value(v) for v in values)


@dataclass
class Segment:
    """A run of consecutive values that ended alike."""

    label: str
    values: list[Any]


@dataclass
class Switch:
    """Where one variable moves runs between outcome classes (values in order, those that ran)."""

    variable: str
    values: list[Any]
    labels: list[str]
    ordered: bool

    @property
    def switched(self) -> bool:
        return len(set(self.labels)) > 1

    @property
    def segments(self) -> list[Segment]:
        """Consecutive values with one label (for an unordered variable: one per label)."""
        if not self.ordered:
            return [Segment(label, [v for v, l in zip(self.values, self.labels) if l == label]) for label in dict.fromkeys(self.labels)]
        segments: list[Segment] = []
        for value, label in zip(self.values, self.labels):
            if segments and segments[-1].label == label:
                segments[-1].values.append(value)
            else:
                segments.append(Segment(label, [value]))
        return segments

    @property
    def monotone(self) -> Optional[bool]:
        """Ordered and switched: one switch only (every value past the threshold ends alike)."""
        return len(self.segments) == 2 if self.ordered and self.switched else None

    @property
    def threshold(self) -> Optional[tuple[Any, Any]]:
        """(last value before, first value after) the switch that matters most: clean to failing if
        there is one, else the first change of class. None when unordered or not switched."""
        if not self.ordered or not self.switched:
            return None
        pairs = list(zip(self.segments, self.segments[1:]))
        for before, after in pairs:
            if CLEAN in (before.label, after.label):
                return before.values[-1], after.values[0]
        return pairs[0][0].values[-1], pairs[0][1].values[0]

    def sentence(self) -> str:
        """The switch in words, with the values; "" when the variable switches nothing."""
        if not self.switched:
            return ""
        var, segments = self.variable, self.segments
        clean = [v for v, l in zip(self.values, self.labels) if l == CLEAN]
        failing = [s for s in segments if s.label != CLEAN]
        classes = "; ".join(f"{s.label} at {_values(s.values)}" for s in failing)
        if not self.ordered:
            if clean:
                return f"fails at {var} = {_values([v for s in failing for v in s.values])} (clean at {_values(clean)}): {classes}"
            return f"ends differently with {var}: {classes}"
        lo, hi = self.threshold
        if self.monotone:
            first, second = segments
            if first.label == CLEAN:
                return (f"fails from {var} >= {fmt_value(hi)} (clean at {_values(first.values)}): {second.label}; "
                        f"the threshold lies between {fmt_value(lo)} and {fmt_value(hi)}, and the failure is monotone in it")
            if second.label == CLEAN:
                return (f"fails up to {var} <= {fmt_value(lo)} (clean at {_values(second.values)}): {first.label}; "
                        f"the threshold lies between {fmt_value(lo)} and {fmt_value(hi)}, and the failure is monotone in it")
            return (f"{first.label} up to {var} <= {fmt_value(lo)}, {second.label} from {var} >= {fmt_value(hi)}; "
                    f"the failure changes class between {fmt_value(lo)} and {fmt_value(hi)}, monotone in it")
        return (f"not monotone in {var}: " + "; ".join(f"{s.label} at {_values(s.values)}" for s in segments)
                + f"; the first switch {'to or from clean ' if clean else ''}lies between {fmt_value(lo)} and {fmt_value(hi)}")


def values_between(lo: Any, hi: Any, points: int = NEXT_POINTS) -> list[Any]:
    """Values strictly between lo and hi for the next sweep: every integer when few, else `points`
    spread evenly (geometrically when hi/lo >= 4, as cache sizes and batch sizes grow)."""
    if isinstance(lo, bool) or not all(isinstance(v, (int, float)) for v in (lo, hi)):
        return []
    lo, hi = min(lo, hi), max(lo, hi)
    integer = isinstance(lo, int) and isinstance(hi, int)
    if integer and hi - lo - 1 <= points + 2:
        return list(range(lo + 1, hi))
    geometric = lo > 0 and hi / lo >= 4
    steps = [k / (points + 1) for k in range(1, points + 1)]
    raw = [lo * (hi / lo) ** t if geometric else lo + (hi - lo) * t for t in steps]
    if integer:
        return sorted({int(round(v, -max(0, int(math.log10(v)) - 1))) if v >= 100 else round(v) for v in raw} - {lo, hi})
    return sorted({float(f"{v:.3g}") for v in raw} - {lo, hi})


def next_sweep_command(variable: str, values: list[Any], overrides: Sequence[str]) -> str:
    """The command that reruns the sweep (its other overrides kept, the last of each key, as Hydra
    applies them) over `values` of `variable`."""
    last: dict[str, str] = {}
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        last.pop(key, None)
        last[key] = override
    swept = last.pop(variable, "")
    # A key the schema lacks (+engine.args.<name>) is added with the sweep's own '+'.
    plus = swept[: len(swept) - len(swept.lstrip("+"))]
    parts = ["python", "-m", "rollout_lab", "-m", *last.values(), f"{plus}{variable}={','.join(fmt_value(v) for v in values)}"]
    return " ".join(shlex.quote(p) for p in parts)
