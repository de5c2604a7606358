"""Structure versus magnitude: does a swept variable change where and how runs fail, or only how much?

For each swept variable the runs are grouped by its value and every feature below is tested
across the groups (scipy; permutations where no closed form fits):

  structure  outcome    how runs end, by outcome class (outcome.py): clean, silent mismatch,
                        sync mismatch, crash by its key; compared as facts, no p-value. A value
                        that moves runs between classes switches the failure on, off or into
                        another class: the verdict names the threshold (Switch.sentence)
             shape      KS on log10 |difference| standardized per run (median, IQR): scaling every
                        difference by a factor leaves it unchanged, a changed mix of failing and
                        clean tokens does not
             position, step, sample_index, worker, kv_block, state_slot
                        where the larger differences fall: each token's percentile rank within
                        its run, compared across groups within each category of the feature
                        (stratified permutation test; effect eta^2). Ranks make it blind to
                        scale, strata make it blind to a shift in how many tokens each category
                        holds (a bigger cache hands out higher block ids to everyone)
             affected_requests
                        share of requests with a spike (chi-square; effect Cramer's V). It counts
                        threshold crossings, so a magnitude change that lifts whole requests over
                        the spike threshold moves it too: it speaks for failures well above it
  magnitude  magnitude  per-request log10 max |difference|
             spike_rate per-request share of tokens above the spike threshold
                        (Spearman trend for ordered values, effect |rho|; else Kruskal-Wallis,
                        effect epsilon^2)

p-values are Holm-adjusted over every test in the sweep: a verdict rests on any one feature
moving, so the family-wise error is what must stay at ALPHA. A feature moved when its adjusted
p < ALPHA and its effect reaches MIN_EFFECT (thousands of tokens make tiny effects significant).
Verdict: structural if a structure feature moved, else magnitude-only if a magnitude feature
moved, else none; none as well when no run failed at all. Runs vLLM refused to start (not run)
enter no test; a variable with fewer than two values that ran gets no verdict. Each verdict
carries one sentence a user can act on, and for a threshold the values the next sweep should try.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from rollout_lab.analysis.outcome import Switch, fmt_value, values_between
from rollout_lab.analysis.stats import bin_codes, cramers_v, holm, stratified_rank_test
from rollout_lab.analysis.signature import LOCATION_FEATURES, RunSignature

STRUCTURE, MAGNITUDE = "structure", "magnitude"
STRUCTURAL, MAGNITUDE_ONLY, NONE, NO_VERDICT = "structural", "magnitude-only", "none", "no verdict"
ALPHA = 0.05
# Smallest effect that counts as a move, per effect measure (Cohen-style "small to medium").
MIN_EFFECT = {"D": 0.15, "eta^2": 0.02, "Cramer's V": 0.2, "|rho|": 0.2, "epsilon^2": 0.04}
# Fewest tokens a group needs for a token-level test.
MIN_TOKENS = 10
# Config keys that differ between runs without being swept.
UNSWEPT_KEYS = ("run_dir", "run_name", "logger.")
# log10 of a zero difference (identical logprobs) lands here, below any float noise.
LOG_FLOOR = 1e-12


@dataclass
class FeatureTest:
    """One feature compared across the values of one variable."""

    feature: str
    kind: str  # structure | magnitude
    test: str
    statistic: float
    # None: a comparison of facts (crash signatures of seeded runs), not of samples.
    p_value: Optional[float]
    effect_size: float
    effect_name: str
    p_adjusted: Optional[float] = None
    moved: bool = False


@dataclass
class VariableVerdict:
    """The verdict on one swept variable, with every test behind it."""

    variable: str
    # The values that ran, in order; not_run: the values vLLM refused, with its reason.
    values: list[Any]
    verdict: str = NONE
    reason: str = ""
    # One plain sentence a user can act on.
    sentence: str = ""
    # Ordered variables that switch outcome class: (last value before, first after) and whether
    # the switch happens once only; next_values: what to sweep between them.
    threshold: Optional[tuple[Any, Any]] = None
    monotone: Optional[bool] = None
    next_values: list[Any] = field(default_factory=list)
    not_run: dict[str, str] = field(default_factory=dict)
    tests: list[FeatureTest] = field(default_factory=list)

    @property
    def moved(self) -> list[FeatureTest]:
        """Tests whose feature moved, strongest first."""
        return sorted((t for t in self.tests if t.moved), key=lambda t: -t.effect_size / MIN_EFFECT.get(t.effect_name, 1.0))

    @property
    def headline(self) -> Optional[FeatureTest]:
        """The test a ranked table shows: the strongest move of the verdict's kind, else the smallest p."""
        kind = {STRUCTURAL: STRUCTURE, MAGNITUDE_ONLY: MAGNITUDE}.get(self.verdict)
        moved = [t for t in self.moved if t.kind == kind]
        if moved:
            return moved[0]
        tested = [t for t in self.tests if t.p_adjusted is not None]
        return min(tested, key=lambda t: t.p_adjusted) if tested else None

    def to_dict(self) -> dict:
        return asdict(self) | {"moved": [t.feature for t in self.moved]}


def swept_variables(runs: list[RunSignature]) -> dict[str, list[Any]]:
    """Config keys whose value differs between runs, with their values in order."""
    keys = sorted({k for run in runs for k in run.config if not k.startswith(UNSWEPT_KEYS)})
    variables = {}
    for key in keys:
        values = _ordered({_hashable(run.config.get(key)) for run in runs})
        if len(values) > 1:
            variables[key] = values
    return variables


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def _is_ordered(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _ordered(values: set) -> list[Any]:
    values = list(values)
    return sorted(values) if _is_ordered(values) else sorted(values, key=str)


def group_runs(runs: list[RunSignature], variable: str, values: list[Any]) -> list[list[RunSignature]]:
    """The runs at each value of the variable, in the order of values."""
    return [[run for run in runs if _hashable(run.config.get(variable)) == value] for value in values]


def grouped_tokens(groups: list[list[RunSignature]]) -> pd.DataFrame:
    """All tokens of the grouped runs, with group, percentile rank and standardized log |difference|."""
    frames = []
    for g, runs in enumerate(groups):
        for r, run in enumerate(runs):
            if run.tokens.empty:
                continue
            frame = run.tokens.copy()
            log_diff = np.log10(np.maximum(frame["abs_diff"].to_numpy(), LOG_FLOOR))
            frame["group"], frame["run"] = g, f"{g}/{r}"
            frame["request"] = frame["run"] + "/" + frame["request"]
            # Within-run ranks and standardized logs are what pure scaling cannot change.
            frame["rank"] = stats.rankdata(log_diff) / len(log_diff)
            q25, q50, q75 = np.quantile(log_diff, [0.25, 0.5, 0.75])
            spread = (q75 - q25) or np.std(log_diff) or 1.0
            frame["z"] = (log_diff - q50) / spread
            frame["log_diff"] = log_diff
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def value_labels(groups: list[list[RunSignature]]) -> list[str]:
    """Per value, how its runs ended: their common outcome label, or "mixed (a, b)"."""
    labels = []
    for runs in groups:
        own = sorted({run.label for run in runs})
        labels.append(own[0] if len(own) == 1 else f"mixed ({', '.join(own)})")
    return labels


def _outcome_test(groups: list[list[RunSignature]]) -> Optional[FeatureTest]:
    ends = [[run.label for run in runs] for runs in groups]
    labels = sorted({end for group in ends for end in group})
    if len(labels) < 2:
        return None
    table = np.array([[group.count(label) for label in labels] for group in ends])
    moved = len(set(value_labels(groups))) > 1
    return FeatureTest("outcome", STRUCTURE, "outcome classes compared (clean, silent, sync, crash key)", float(len(labels)), None,
                       cramers_v(table), "Cramer's V", moved=moved)


def _shape_test(tokens: pd.DataFrame, ordered: bool) -> Optional[FeatureTest]:
    samples = [tokens.loc[tokens["group"] == g, "z"].to_numpy() for g in sorted(tokens["group"].unique())]
    samples = [s for s in samples if s.size >= MIN_TOKENS]
    if len(samples) < 2:
        return None
    pairs = [(i, i + 1) for i in range(len(samples) - 1)] if ordered else [(i, j) for i in range(len(samples)) for j in range(i + 1, len(samples))]
    results = [stats.ks_2samp(samples[i], samples[j]) for i, j in pairs]
    worst = max(results, key=lambda r: r.statistic)
    # Bonferroni within the feature: the largest of several pairwise D's.
    p = min(1.0, min(r.pvalue for r in results) * len(pairs))
    return FeatureTest("shape", STRUCTURE, "KS, standardized log|diff|", float(worst.statistic), p, float(worst.statistic), "D")


def _location_tests(tokens: pd.DataFrame, rng: np.random.Generator) -> list[FeatureTest]:
    tests = []
    for feature in LOCATION_FEATURES:
        present = tokens[feature].notna().to_numpy()
        if present.sum() < MIN_TOKENS:
            continue
        rows = tokens[present]
        category, _ = bin_codes(rows[feature].to_numpy(dtype=np.int64))
        # Only categories that two or more groups reach can tell the groups apart.
        shared = pd.Series(rows["group"].to_numpy()).groupby(category).nunique()
        keep = np.isin(category, shared.index[shared >= 2])
        if keep.sum() < MIN_TOKENS or np.unique(category[keep]).size < 2:
            continue
        statistic, p, eta2 = stratified_rank_test(rows["rank"].to_numpy()[keep], rows["group"].to_numpy()[keep], category[keep], rng)
        tests.append(FeatureTest(feature, STRUCTURE, "stratified permutation, within-run ranks", statistic, p, eta2, "eta^2"))
    return tests


def _affected_test(tokens: pd.DataFrame) -> Optional[FeatureTest]:
    affected = tokens.groupby("request").agg(group=("group", "first"), spike=("spike", "any"))
    table = pd.crosstab(affected["group"], affected["spike"]).to_numpy()
    if table.shape[0] < 2 or table.shape[1] < 2:
        return None  # every request affected, or none: nothing to compare
    chi2, p, _, _ = stats.chi2_contingency(table, correction=False)
    return FeatureTest("affected_requests", STRUCTURE, "chi-square, requests with a spike", float(chi2), float(p), cramers_v(table), "Cramer's V")


def _magnitude_tests(tokens: pd.DataFrame, values: list[Any], ordered: bool) -> list[FeatureTest]:
    per_request = tokens.groupby("request").agg(group=("group", "first"), magnitude=("log_diff", "max"), spike_rate=("spike", "mean"))
    tests = []
    for feature in ("magnitude", "spike_rate"):
        column = per_request[feature].to_numpy(dtype=float)
        group = per_request["group"].to_numpy()
        if np.unique(group).size < 2 or np.ptp(column) == 0:
            continue
        if ordered:
            x = np.array([values[g] for g in group], dtype=float)
            rho, p = stats.spearmanr(x, column)
            tests.append(FeatureTest(feature, MAGNITUDE, "Spearman trend over requests", float(rho), float(p), abs(float(rho)), "|rho|"))
        else:
            samples = [column[group == g] for g in np.unique(group)]
            h, p = stats.kruskal(*samples)
            epsilon2 = max(0.0, (h - len(samples) + 1) / (len(column) - len(samples)))
            tests.append(FeatureTest(feature, MAGNITUDE, "Kruskal-Wallis over requests", float(h), float(p), float(epsilon2), "epsilon^2"))
    return tests


def variable_tests(runs: list[RunSignature], variable: str, values: list[Any], seed: int = 0) -> list[FeatureTest]:
    """Every feature test for one variable (p-values not yet adjusted)."""
    groups = group_runs(runs, variable, values)
    ordered = _is_ordered(values)
    tests = [t for t in [_outcome_test(groups)] if t is not None]
    tokens = grouped_tokens(groups)
    if tokens.empty or tokens["group"].nunique() < 2:
        return tests
    rng = np.random.default_rng(seed)
    tests += [t for t in [_shape_test(tokens, ordered)] if t is not None]
    tests += _location_tests(tokens, rng)
    tests += [t for t in [_affected_test(tokens)] if t is not None]
    tests += _magnitude_tests(tokens, values, ordered)
    return tests


def variable_verdicts(runs: list[RunSignature], seed: int = 0, not_run: Sequence[RunSignature] = ()) -> list[VariableVerdict]:
    """A verdict per swept variable, tests Holm-adjusted across the whole sweep, ranked strongest first.

    runs: the runs with a result; not_run: those vLLM refused, which only name the values that
    did not run (a variable swept over refused values alone is still reported).
    """
    verdicts = []
    for variable, values in swept_variables([*runs, *not_run]).items():
        ran = [v for v in values if any(_hashable(r.config.get(variable)) == v for r in runs)]
        refused = {fmt_value(_hashable(r.config.get(variable))): r.refusal or "" for r in not_run}
        verdicts.append(VariableVerdict(variable, ran, not_run={k: v for k, v in refused.items() if k not in map(fmt_value, ran)}))
    any_failure = any(run.failed for run in runs)
    for verdict in verdicts:
        if any_failure and len(verdict.values) > 1:
            verdict.tests = variable_tests(runs, verdict.variable, verdict.values, seed)
    tested = [t for v in verdicts for t in v.tests if t.p_value is not None]
    for test, adjusted in zip(tested, holm([t.p_value for t in tested])):
        test.p_adjusted = adjusted
        test.moved = adjusted < ALPHA and test.effect_size >= MIN_EFFECT[test.effect_name]
    for verdict in verdicts:
        _decide(verdict, runs, any_failure)
    rank = {STRUCTURAL: 0, MAGNITUDE_ONLY: 1, NONE: 2, NO_VERDICT: 3}
    return sorted(verdicts, key=lambda v: (rank[v.verdict], -(v.headline.effect_size if v.headline else 0.0)))


# How a magnitude feature reads per run in a sentence.
SIZE_STATS = {
    "magnitude": ("max |diff|", lambda run: run.abs_diff_quantiles.get("max", 0.0)),
    "spike_rate": ("spike rate", lambda run: run.spike_rate),
}


def _per_value(groups: list[list[RunSignature]], values: list[Any], stat) -> str:
    """'a at v0 to b at vN' for a per-run statistic averaged over each end value's runs."""
    first, last = (float(np.mean([stat(r) for r in g])) for g in (groups[0], groups[-1]))
    return f"{fmt_value(first)} at {fmt_value(values[0])} to {fmt_value(last)} at {fmt_value(values[-1])}"


def _decide(verdict: VariableVerdict, runs: list[RunSignature], any_failure: bool) -> None:
    """The verdict, its reason (which features moved) and its sentence (what to do about it)."""
    var, values = verdict.variable, verdict.values
    refused = f"; not run at {', '.join(verdict.not_run)} (vLLM refused the configuration)" if verdict.not_run else ""
    if len(values) < 2:
        verdict.verdict = NO_VERDICT
        verdict.reason = verdict.sentence = (
            f"only {var} = {fmt_value(values[0])} ran{refused}: nothing to compare" if values
            else f"every point was refused by vLLM{refused}: no verdict")
        return
    groups = group_runs(runs, var, values)
    switch = Switch(var, values, value_labels(groups), _is_ordered(values))
    structure = [t.feature for t in verdict.moved if t.kind == STRUCTURE]
    magnitude = [t.feature for t in verdict.moved if t.kind == MAGNITUDE]
    alike = f"fails alike at every value ({switch.labels[0]})" if not switch.switched else ""
    if not any_failure:
        verdict.verdict, verdict.reason = NONE, "no run failed: no crash, no sync mismatch, no token above the spike threshold"
        verdict.sentence = f"clean at every value ({', '.join(map(fmt_value, values))}): {var} does not switch a failure on here"
    elif structure:
        verdict.verdict, verdict.reason = STRUCTURAL, f"where/how it fails moved: {', '.join(structure)}"
        if switch.switched:
            verdict.sentence = switch.sentence()
            verdict.threshold, verdict.monotone = switch.threshold, switch.monotone
            if switch.threshold is not None:
                verdict.next_values = values_between(*switch.threshold)
        else:
            verdict.sentence = (f"{alike}, but where it fails moves with {var} ({', '.join(structure)}); requests affected "
                                f"{_per_value(groups, values, lambda r: r.affected_request_share)}: {var} is part of the trigger")
    elif magnitude:
        verdict.verdict, verdict.reason = MAGNITUDE_ONLY, f"same shape, size moved: {', '.join(magnitude)}"
        name, stat = SIZE_STATS[verdict.headline.feature]
        verdict.sentence = (f"{alike} with the same shape; only its size moves with {var} ({name} "
                            f"{_per_value(groups, values, stat)}): {var} scales the failure, it does not switch it on")
    else:
        verdict.verdict, verdict.reason = NONE, "no feature moved beyond chance and the minimum effect"
        verdict.sentence = f"{alike or 'fails'}: neither where nor how much it fails changes with {var}; look elsewhere for the trigger"
    verdict.sentence += refused
