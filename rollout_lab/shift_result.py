"""The shift test's result, typed (rollout_lab/shift.py computes it; summary.json carries it,
records.py reads it back): one ConditionTest per condition tested, the ShiftResult of a run."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

# What a run was tested against: the clean profile, itself, or nothing (the test did not run).
PROFILE, SELF, NONE = "profile", "self", "none"
# A moved condition's A must reach 0.5 + MIN_EFFECT: thousands of tokens make tiny shifts significant, and a
# clean run differs from the profile's runs by its prompts. A level is named over "all tokens" only when its
# A exceeds all tokens' by as much: a bug that moves every token (logit noise) is a shift of all tokens.
MIN_EFFECT = 0.03

@dataclass
class ConditionTest:
    """The run's |difference| in one condition against its reference (the profile's, or the rest of the run)."""

    factor: str
    level: str
    test: str
    run_tokens: int
    run_sequences: int
    reference_tokens: int
    reference_sequences: int
    run_mean: float
    reference_mean: float
    run_p95: float
    reference_p95: float
    effect: float  # Vargha-Delaney A
    p_value: float
    p_adjusted: float = 1.0
    moved: bool = False
    # Against a profile: A of the run's other tokens of this factor against the profile's (None: no other level).
    rest_effect: Optional[float] = None
    # And the one-sided p that, inside the run, this level's tokens rank above the rest of its factor's.
    rest_p: Optional[float] = None

    @property
    def singled_out(self) -> bool:
        """This level moved (p < 0.05) by MIN_EFFECT more than the rest of its factor's tokens did, and inside the
        run its tokens rank above the rest's (p < 0.05): a small level's A alone is too noisy to name it."""
        return (self.rest_effect is not None and self.rest_p is not None and self.p_value < 0.05 and self.rest_p < 0.05
                and self.effect >= self.rest_effect + MIN_EFFECT)

    @property
    def condition(self) -> str:
        return f"{self.factor} {self.level}"

    def sentence(self) -> str:
        """'position 16-31: A 0.61 (the rest of position: A 0.52), p 0.001 (0.004 Holm), mean |diff| 0.045 vs 0.038, p95 0.15 vs 0.10, 132 tokens'."""
        rest = f" (the rest of {self.factor}: A {self.rest_effect:.3f})" if self.rest_effect is not None else ""
        return (f"{self.condition}: A {self.effect:.3f}{rest}, p {self.p_value:.3g} ({self.p_adjusted:.3g} Holm), mean |diff| "
                f"{self.run_mean:.3g} vs {self.reference_mean:.3g}, p95 {self.run_p95:.3g} vs {self.reference_p95:.3g}, {self.run_tokens} tokens")


@dataclass
class ShiftResult:
    """A run's shift test (summary.json's `shift`): what it was tested against, and every condition's test."""

    reference: str  # profile | self | none
    reference_detail: str
    shifted: bool = False
    tests: list[ConditionTest] = field(default_factory=list)

    @property
    def headline(self) -> Optional[ConditionTest]:
        """Where a shifted run moved: the level that moved most beyond the rest of its factor, else all tokens,
        else the moved condition with the smallest adjusted p; for a run not shifted, the closest condition."""
        if self.shifted:
            levels = [t for t in self.tests if t.singled_out]
            if levels:
                return max(levels, key=lambda t: (t.effect - t.rest_effect, -t.p_value))
            everything = [t for t in self.tests if t.factor == "all" and t.moved]
            if everything:
                return everything[0]
        pool = [t for t in self.tests if t.moved] or self.tests
        return min(pool, key=lambda t: (t.p_adjusted, -t.effect)) if pool else None

    def sentence(self) -> str:
        """One line for the console and reports."""
        if self.reference == NONE:
            return f"shift test not run: {self.reference_detail}"
        against = "the clean profile" if self.reference == PROFILE else "itself (no profile: weaker)"
        head = self.headline
        if head is None:
            return f"shift test against {against}: no condition had enough tokens"
        verdict = "shifted" if self.shifted else "no condition moved; closest"
        return f"shift test against {against}, {len(self.tests)} conditions: {verdict} {head.sentence()}"

    def to_dict(self) -> dict:
        return asdict(self)

    def wandb_summary(self) -> dict:
        """Flat shift/* keys for the W&B run summary: the verdict and the headline condition's numbers."""
        head = self.headline
        out = {"shift/shifted": self.shifted, "shift/reference": self.reference, "shift/conditions_tested": len(self.tests)}
        if head is not None:
            out |= {"shift/condition": head.condition, "shift/effect_A": head.effect, "shift/p_adjusted": head.p_adjusted,
                    "shift/run_mean": head.run_mean, "shift/reference_mean": head.reference_mean, "shift/run_tokens": head.run_tokens}
        return out

    def table_rows(self) -> tuple[list[str], list[list]]:
        """Every condition's test as (columns, rows), for a W&B table."""
        columns = ["condition", "effect_A", "p_value", "p_adjusted", "moved", "run_tokens", "reference_tokens", "run_mean", "reference_mean"]
        return columns, [[t.condition, t.effect, t.p_value, t.p_adjusted, t.moved, t.run_tokens, t.reference_tokens, t.run_mean,
                          t.reference_mean] for t in self.tests]

    @classmethod
    def from_dict(cls, data: dict) -> "ShiftResult":
        return cls(**{**data, "tests": [ConditionTest(**t) for t in data.get("tests", [])]})
