"""Constraints between engine knobs, learned from vLLM's refusals: so that most drawn engines start.

    rejected group (engine point, vLLM's complaint) -> Constraint.learn -> Exclusion -> Planner skips
    every engine point the exclusion covers

A constraint is what vLLM checks (its refusal's wording, and the knobs it involves); it is learned
when one of its refusals comes back for a point that breaks it, and from then on the planner draws
no point that breaks it. Relations between numbers (a token budget below max_model_len with chunked
prefill off) are learned whole; a combination that holds for one model or backend only (batch
invariant mode with a Mamba2 backend) is learned for the values the refused point had. The store
keeps every rejected group and its message, so a resumed hunt learns the same exclusions again.
A refusal no constraint explains stays a plain rejection, listed in the report.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

BUDGET, SEQS, LEN = "engine.max_num_batched_tokens", "engine.max_num_seqs", "engine.max_model_len"
CHUNKED, PREFIX = "engine.enable_chunked_prefill", "engine.enable_prefix_caching"
BATCH_INVARIANT = "env.VLLM_BATCH_INVARIANT"


def _below(small: str, big: str) -> Callable[[dict], bool]:
    """Both knobs set (null is vLLM's default, which it sizes itself) and the first below the second."""
    return lambda point: point.get(small) is not None and point.get(big) is not None and point[small] < point[big]


# Relations between knobs, by name: an Exclusion names one, so it stays a plain record.
RELATIONS: dict[str, Callable[[dict], bool]] = {
    "max_num_batched_tokens < max_num_seqs": _below(BUDGET, SEQS),
    "max_num_batched_tokens < max_model_len": _below(BUDGET, LEN),
}


@dataclass(frozen=True)
class Exclusion:
    """Engine points this hunt no longer draws: those with every (dimension, value) of `when` and,
    if named, the relation holding."""

    constraint: str
    when: tuple[tuple[str, object], ...] = ()
    relation: Optional[str] = None

    def covers(self, point: dict) -> bool:
        return all(point.get(dim) == value for dim, value in self.when) and (
            self.relation is None or RELATIONS[self.relation](point))

    def describe(self) -> str:
        parts = ([self.relation] if self.relation else []) + [f"{dim.split('.', 1)[-1]}={value}" for dim, value in self.when]
        return " with ".join(parts) if self.relation else ", ".join(parts)


@dataclass(frozen=True)
class Constraint:
    """One check vLLM makes: its refusal's wording, and the exclusion a refused point teaches."""

    name: str
    refusal: re.Pattern
    # The refused point and vLLM's complaint -> what to exclude; None: the point does not break it.
    teach: Callable[[dict, str], Optional[Exclusion]]

    def learn(self, point: dict, message: str) -> Optional[Exclusion]:
        if not self.refusal.search(message):
            return None
        exclusion = self.teach(point, message)
        # Only an exclusion that covers the refused point explains its refusal.
        return exclusion if exclusion is not None and exclusion.covers(point) else None


def _relation(name: str, when: tuple = ()) -> Callable[[dict, str], Exclusion]:
    return lambda point, message: Exclusion(name, when, name)


def _same(name: str, *dims: str) -> Callable[[dict, str], Exclusion]:
    """The refused point's values of `dims`, together."""
    return lambda point, message: Exclusion(name, tuple((d, point.get(d)) for d in dims))


def _batch_invariant(point: dict, message: str) -> Exclusion:
    # vLLM names the backend it refuses: a Mamba one comes with the model, an attention one with
    # the attention_backend knob (null: vLLM's choice, which follows the model).
    backend = re.search(r"not supported for (\S+?)\.?$", message.strip())
    mamba = backend is not None and "MAMBA" in backend.group(1).upper()
    dim = "model" if mamba or point.get("engine.attention_backend") is None else "engine.attention_backend"
    return Exclusion("batch invariant mode on an unsupported backend", ((BATCH_INVARIANT, point.get(BATCH_INVARIANT)),
                                                                        (dim, point.get(dim))))


# What vLLM refuses, as of vLLM 0.25-0.32 (config/scheduler.py, model_executor/models/config.py,
# v1/attention/selector.py). Adding one is a line here.
CONSTRAINTS = (
    Constraint("max_num_batched_tokens < max_num_seqs",
               re.compile(r"max_num_batched_tokens \(\d+\) must be greater than or equal to max_num_seqs"),
               _relation("max_num_batched_tokens < max_num_seqs")),
    Constraint("max_num_batched_tokens < max_model_len",
               re.compile(r"max_num_batched_tokens \(\d+\) is smaller than max_model_len"),
               lambda point, message: Exclusion("max_num_batched_tokens < max_model_len", ((CHUNKED, False),),
                                                "max_num_batched_tokens < max_model_len")),
    Constraint("Mamba prefix caching needs chunked prefill",
               re.compile(r"Chunked prefill is required for mamba cache mode"),
               _same("Mamba prefix caching needs chunked prefill", "model", PREFIX, CHUNKED)),
    Constraint("batch invariant mode on an unsupported backend",
               re.compile(r"batch_invariant mode is not supported"), _batch_invariant),
)


def learn(point: dict, message: str) -> Optional[Exclusion]:
    """The exclusion a refused engine point teaches (the first constraint that explains it), or None."""
    return next((e for c in CONSTRAINTS if (e := c.learn(point, message or "")) is not None), None)


class Learned:
    """The exclusions learned so far, and which rejected groups taught or hit each."""

    def __init__(self):
        self.exclusions: list[Exclusion] = []
        # exclusion -> indices of the rejected groups it explains
        self.explained: dict[Exclusion, list[int]] = {}
        self.unexplained: list[int] = []

    @classmethod
    def from_groups(cls, groups) -> "Learned":
        """What a hunt's rejected groups (store.GroupRow, in order) teach."""
        learned = cls()
        for g in groups:
            if g.status == "rejected":
                learned.record(g.idx, g.engine, g.message or "")
        return learned

    def record(self, group: int, point: dict, message: str) -> Optional[Exclusion]:
        """A rejected group: learn from it (or count it against an exclusion already learned)."""
        known = next((e for e in self.exclusions if e.covers(point)), None)
        exclusion = known or learn(point, message)
        if exclusion is None:
            self.unexplained.append(group)
            return None
        if exclusion not in self.explained:
            self.exclusions.append(exclusion)
        self.explained.setdefault(exclusion, []).append(group)
        return exclusion

    def allows(self, point: dict) -> bool:
        return not any(e.covers(point) for e in self.exclusions)

    def report_lines(self) -> list[str]:
        """HUNT_REPORT.md's lines: how many draws each learned exclusion explains, now excluded."""
        # A relation's description is its constraint's name; a combination's says which one it is.
        return [f"- {len(groups)} draw(s) rejected: {e.describe()}" + ("" if e.relation else f" ({e.constraint})")
                + "; now excluded" for e, groups in self.explained.items()]
