"""The shift test: did a run's |sampler - trainer| distribution move, in some recorded condition?

In bfloat16 a clean token's |difference| reaches 0.26 on CPU, so the spike threshold (1.5) cannot see
a bug that moves logprobs by 0.05-0.3. This module compares distributions instead of single tokens:

    run dir  --shift_frame-->  one row per token: its sequence, prompt, |difference|, conditions (shift_conditions.py)
    calibrate.py (clean runs)  --write_profile-->  <cache>/shift_profiles/<key>.parquet (ShiftProfile)
    run frame + profile frame  --shift_test-->  ShiftResult: one ConditionTest per condition, Holm-adjusted

Per condition (a level of one factor: position bucket, engine batch size, prefix-cache hit, after a
preemption, chunked prefill, KV block range, or all tokens) the run's tokens in it are compared with
the profile's tokens in it: one-sided (the run larger), on mid-ranks of the pooled |difference| (ties
and bfloat16's discrete values are what ranks handle), with a permutation of whole prompts between
run and profile (a prompt's samples are not independent: they share the prompt, its KV blocks, a
batch). Effect size: Vargha-Delaney A, the chance a run token's |difference| exceeds a profile
token's (ties count half; 0.5 = no shift). A condition moved when its Holm-adjusted p < ALPHA (the
sweep analysis' correction and level) and A >= 0.5 + MIN_EFFECT. Without a profile the run is tested
against itself (each level against the rest of the run; paired within sequences where a sequence
holds both): weaker, since a clean run's own conditions may differ (docs/shift.md).
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rollout_lab.analysis.verdict import ALPHA, holm
from rollout_lab.shift_conditions import FACTORS, FRAME_COLUMNS, condition_counts, shift_frame, units
from rollout_lab.shift_result import MIN_EFFECT, NONE, PROFILE, SELF, ConditionTest, ShiftResult

# 2: tokens carry their prompt, the unit the profile test permutes.
PROFILE_VERSION = "2"
# Permutations per condition: with Holm over ~20 conditions the smallest reachable adjusted p is
# ~20 / (PERMUTATIONS + 1) = 0.01 < ALPHA.
PERMUTATIONS = 1999
# Fewest run tokens and sequences a condition needs to be tested.
MIN_TOKENS, MIN_SEQUENCES = 30, 4


# -- the statistics -----------------------------------------------------------------------------

def _midranks(values: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(values, method="average")


def vargha_delaney(x: np.ndarray, y: np.ndarray) -> float:
    """A = P(x > y) + P(x = y) / 2 over all pairs, from mid-ranks (0.5: no shift, 1: every x above every y)."""
    ranks = _midranks(np.concatenate([x, y]))
    return float((ranks[: len(x)].mean() - (len(x) + 1) / 2) / len(y))


def cluster_permutation_test(x: np.ndarray, x_clusters: np.ndarray, y: np.ndarray, y_clusters: np.ndarray,
                             rng: np.random.Generator, permutations: int = PERMUTATIONS) -> float:
    """One-sided p that x's tokens rank above y's, whole clusters (sequences) permuted between the samples.

    Statistic: the mean pooled mid-rank of x's tokens; under the null any set of clusters, as many as x
    has, is as likely to be x's."""
    ranks = _midranks(np.concatenate([x, y]))
    _, codes = np.unique(np.concatenate([np.char.add("x", x_clusters.astype(str)), np.char.add("y", y_clusters.astype(str))]), return_inverse=True)
    sums, counts = np.bincount(codes, ranks), np.bincount(codes).astype(float)
    x_codes = np.unique(codes[: len(x)])
    observed = sums[x_codes].sum() / counts[x_codes].sum()
    chosen = np.argsort(rng.random((permutations, len(sums))), axis=1)[:, : len(x_codes)]
    null = sums[chosen].sum(axis=1) / counts[chosen].sum(axis=1)
    return float((1 + np.sum(null >= observed - 1e-9)) / (permutations + 1))


def paired_signflip_test(x: np.ndarray, x_clusters: np.ndarray, y: np.ndarray, y_clusters: np.ndarray,
                         rng: np.random.Generator, permutations: int = PERMUTATIONS) -> float:
    """One-sided p that x ranks above y within the clusters holding both: the per-cluster difference of
    mean mid-ranks, its sign flipped at random (a sequence's own level is its control)."""
    ranks = _midranks(np.concatenate([x, y]))
    frame = pd.DataFrame({"rank": ranks, "cluster": np.concatenate([x_clusters, y_clusters]),
                          "side": np.r_[np.ones(len(x)), np.zeros(len(y))]})
    means = frame.groupby(["cluster", "side"])["rank"].mean().unstack()
    diffs = (means[1.0] - means[0.0]).dropna().to_numpy() if {0.0, 1.0} <= set(means.columns) else np.zeros(0)
    if diffs.size == 0:
        return 1.0
    signs = rng.choice([-1.0, 1.0], size=(permutations, diffs.size))
    null = (signs * diffs).mean(axis=1)
    return float((1 + np.sum(null >= diffs.mean() - 1e-9)) / (permutations + 1))


def _summary(test: str, factor: str, level: str, x: pd.DataFrame, y: pd.DataFrame, p: float) -> ConditionTest:
    a, b = x["abs_diff"].to_numpy(), y["abs_diff"].to_numpy()
    return ConditionTest(factor, level, test, len(a), x["sequence"].nunique(), len(b), y["sequence"].nunique(),
                         float(a.mean()), float(b.mean()), float(np.quantile(a, 0.95)), float(np.quantile(b, 0.95)),
                         vargha_delaney(a, b), p)


def _compare(test_fn, name: str, factor: str, level: str, x: pd.DataFrame, y: pd.DataFrame, rng,
             unit: str = "sequence") -> Optional[ConditionTest]:
    if len(x) < MIN_TOKENS or x["sequence"].nunique() < MIN_SEQUENCES or len(y) < MIN_TOKENS:
        return None
    p = test_fn(x["abs_diff"].to_numpy(), x[unit].to_numpy(), y["abs_diff"].to_numpy(), y[unit].to_numpy(), rng)
    return _summary(name, factor, level, x, y, p)


def _within_run(factor: str, level: str, inside: pd.DataFrame, rest: pd.DataFrame, rng) -> Optional[ConditionTest]:
    """A level's tokens against the rest of the run: paired within the sequences holding both where the level
    splits sequences (position, batch size, KV block), else a sequence permutation."""
    split = bool(set(inside["sequence"]) & set(rest["sequence"]))
    test_fn, label = ((paired_signflip_test, "paired sign-flip within sequences, level vs rest of run") if split
                      else (cluster_permutation_test, "sequence permutation of mid-ranks, level vs rest of run"))
    return _compare(test_fn, label, factor, level, inside, rest, rng)


def shift_test(run: pd.DataFrame, profile: Optional[pd.DataFrame], seed: int = 0, reference_detail: str = "") -> ShiftResult:
    """Every condition of `run` (a shift_frame) against `profile` (a clean shift_frame), or against the run
    itself when profile is None; Holm over the conditions tested."""
    rng = np.random.default_rng(seed)
    tests: list[ConditionTest] = []
    for name, factor in FACTORS.items():
        run_levels = factor.levels(run)
        if profile is not None:
            profile_levels = factor.levels(profile)
            # Each token's permutation unit for this factor, labelled once (shift_conditions.units).
            run_units, profile_units = run.assign(unit=units(run, factor.unit)), profile.assign(unit=units(profile, factor.unit))
            for level in sorted(set(run_levels.dropna())):
                inside, rest = run_levels == level, run_levels.notna() & (run_levels != level)
                if name != "all" and not rest.any() and (profile_levels.dropna() == level).all():
                    continue  # every token of both in one level (no prefix-cache hit, say): the all-tokens test again
                test = _compare(cluster_permutation_test, f"{factor.unit} permutation of mid-ranks, run vs profile", name,
                                level, run_units[inside], profile_units[profile_levels == level], rng, unit="unit")
                if test is not None:
                    profile_rest = profile_levels.notna() & (profile_levels != level)
                    if rest.any() and profile_rest.any():  # where the fault acts, the level moved more than the rest
                        test.rest_effect = vargha_delaney(run.loc[rest, "abs_diff"].to_numpy(), profile.loc[profile_rest, "abs_diff"].to_numpy())
                        within = _within_run(name, level, run[inside], run[rest], rng)
                        test.rest_p = within.p_value if within is not None else None
                    tests.append(test)
            continue
        known = run_levels.notna()
        if name == "all" or run_levels[known].nunique() < 2:
            continue
        for level in sorted(set(run_levels[known])):
            test = _within_run(name, level, run[known & (run_levels == level)], run[known & (run_levels != level)], rng)
            if test is not None:
                tests.append(test)
    for test, adjusted in zip(tests, holm([t.p_value for t in tests])):
        test.p_adjusted = adjusted
        test.moved = adjusted < ALPHA and test.effect >= 0.5 + MIN_EFFECT
    return ShiftResult(PROFILE if profile is not None else SELF, reference_detail, any(t.moved for t in tests), tests)


# -- the profile: clean runs' tokens, per device, engine release, dtype and model ---------------------

class ProfileError(ValueError):
    """A shift profile file that cannot be read; the message names it."""


@dataclass
class ShiftProfile:
    """Clean runs' tokens (a shift_frame) for one key, and what it took to measure them."""

    key: str
    runs: int
    steps: int
    seconds: float
    tokens: pd.DataFrame
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    @property
    def condition_tokens(self) -> dict[str, int]:
        return condition_counts(self.tokens)


def profile_key(cfg) -> str:
    """calibrate.py's key (device | engine release | sampler row) with the trainer's dtype and the model."""
    from rollout_lab.tolerances import calibration_key, engine_row

    return f"{calibration_key(engine_row(cfg))} | trainer {cfg.trainer.dtype} | {cfg.model.name}"


def profile_path(key: str) -> Path:
    from rollout_lab.models import cache_dir

    return cache_dir() / "shift_profiles" / (re.sub(r"[^A-Za-z0-9.]+", "_", key).strip("_") + ".parquet")


def write_profile(path: Path, profile: ShiftProfile) -> Path:
    """The profile as Parquet (its tokens) with the header in the schema's metadata, written atomically."""
    header = {"version": PROFILE_VERSION, "key": profile.key, "runs": profile.runs, "steps": profile.steps,
              "seconds": profile.seconds, "created": profile.created, "condition_tokens": profile.condition_tokens}
    table = pa.Table.from_pandas(profile.tokens[list(FRAME_COLUMNS)].astype({"preempted": "boolean", "chunked_prefill": "boolean"}),
                                 preserve_index=False)
    table = table.replace_schema_metadata({b"rollout_lab.shift_profile": json.dumps(header).encode()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def read_profile(path: Path) -> ShiftProfile:
    """A profile written by write_profile; ProfileError names a missing, damaged or foreign file."""
    try:
        table = pq.read_table(path)
        header = json.loads((table.schema.metadata or {})[b"rollout_lab.shift_profile"])
    except FileNotFoundError:
        raise ProfileError(f"no shift profile at {path}") from None
    except Exception as exc:  # pyarrow and json raise several types for a damaged file
        raise ProfileError(f"shift profile {path} is unreadable: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    if header.get("version") != PROFILE_VERSION:
        raise ProfileError(f"shift profile {path} has version {header.get('version')}, expected {PROFILE_VERSION}")
    tokens = table.to_pandas()
    for column in ("preempted", "chunked_prefill"):
        tokens[column] = tokens[column].astype(object).where(tokens[column].notna(), None)
    return ShiftProfile(header["key"], header["runs"], header["steps"], header["seconds"], tokens, header["created"])


def shift_of_run(run_dir: Path, cfg, seed: int = 0) -> ShiftResult:
    """The run's shift test against the profile matching its config, else against itself."""
    run = shift_frame(run_dir)
    if run.empty:
        return ShiftResult(NONE, "the run recorded no tokens")
    key = profile_key(cfg)
    path = profile_path(key)
    if path.exists():
        return shift_test(run, read_profile(path).tokens, seed, f"{path} [{key}]")
    return shift_test(run, None, seed, f"no profile for [{key}] (python -m rollout_lab.calibrate writes one)")


def main(argv: Optional[list[str]] = None) -> None:
    """`python -m rollout_lab.shift RUN_DIR [--per-step] [--profile P]`: a run dir's shift test, printed."""
    import argparse

    from rollout_lab.records import RecordsError, read_config

    parser = argparse.ArgumentParser(description="Test a run's |sampler - trainer| distribution per condition (docs/shift.md).")
    parser.add_argument("run_dir")
    parser.add_argument("--profile", help="a shift profile file (default: the one matching the run's config; none: the run against itself)")
    parser.add_argument("--per-step", action="store_true", help="test each RL step as a run of its own (how docs/shift.md measures)")
    args = parser.parse_args(argv)
    try:
        cfg, run = read_config(args.run_dir), shift_frame(args.run_dir)
        path = Path(args.profile) if args.profile else profile_path(profile_key(cfg))
        profile = read_profile(path).tokens if args.profile or path.exists() else None
    except (RecordsError, ProfileError) as exc:
        raise SystemExit(f"rollout_lab.shift: {exc}") from None
    detail = str(path) if profile is not None else "no profile"
    parts = [(f"step {step}", frame) for step, frame in run.groupby("step")] if args.per_step else [("run", run)]
    for name, frame in parts:
        result = shift_test(frame, profile, reference_detail=detail)
        print(f"{name}: {result.sentence()}")


if __name__ == "__main__":
    main()
