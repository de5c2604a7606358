"""The shift test: did a run's |sampler - trainer| distribution move, in some recorded condition?

In bfloat16 a clean token's |difference| reaches 0.26 on CPU, so the spike threshold (1.5) cannot see
a bug that moves logprobs by 0.05-0.3. This module compares distributions instead of single tokens:

    run dir  --shift_frame-->  one row per token: its sequence, |difference| and the CONDITIONS' facts
    calibrate.py (clean runs)  --write_profile-->  <cache>/shift_profiles/<key>.parquet (ShiftProfile)
    run frame + profile frame  --shift_test-->  ShiftResult: one ConditionTest per condition, Holm-adjusted

Per condition (a level of one factor: position bucket, engine batch size, prefix-cache hit, after a
preemption, chunked prefill, KV block range, or all tokens) the run's tokens in it are compared with
the profile's tokens in it: one-sided (the run larger), on mid-ranks of the pooled |difference| (ties
and bfloat16's discrete values are what ranks handle), with a permutation of whole sequences between
run and profile (tokens of one sequence are not independent: they share a prompt, a KV history, a
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rollout_lab.analysis.verdict import ALPHA, holm
from rollout_lab.shift_result import NONE, PROFILE, SELF, ConditionTest, ShiftResult

PROFILE_VERSION = "1"
# Permutations per condition: with Holm over ~20 conditions the smallest reachable adjusted p is
# ~20 / (PERMUTATIONS + 1) = 0.01 < ALPHA.
PERMUTATIONS = 1999
# A moved condition's A must reach 0.5 + MIN_EFFECT: thousands of tokens make tiny shifts significant,
# and a clean run differs from the profile's runs by its prompts (measured in docs/shift.md).
MIN_EFFECT = 0.03
# Fewest run tokens and sequences a condition needs to be tested.
MIN_TOKENS, MIN_SEQUENCES = 30, 4


def _buckets(values: pd.Series, edges: tuple[int, ...]) -> pd.Series:
    """'8-15', '16-31', '128+' labels of integer values cut at edges (NaN stays unknown)."""
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(edges, edges[1:])] + [f"{edges[-1]}+"]
    codes = np.searchsorted(np.asarray(edges), values.to_numpy(dtype=float), side="right") - 1
    out = pd.Series([labels[c] if c >= 0 else None for c in codes], index=values.index, dtype=object)
    out[values.isna()] = None
    return out


def _flag(values: pd.Series, yes: str, no: str) -> pd.Series:
    out = pd.Series(np.where(values.fillna(False).astype(bool), yes, no), index=values.index, dtype=object)
    out[values.isna()] = None
    return out


@dataclass(frozen=True)
class Factor:
    """One recorded condition a token can be in, as labels of its levels (None: not recorded)."""

    name: str
    levels: Callable[[pd.DataFrame], pd.Series]


# The conditions tested, each a factor whose levels cut the tokens. One table: adding one is a line here
# (and, if it needs a fact the records do not carry, a column in shift_frame).
FACTORS = {
    "all": Factor("all", lambda f: pd.Series("tokens", index=f.index, dtype=object)),
    "position": Factor("position", lambda f: _buckets(f["position"], (0, 8, 16, 32, 128, 512))),
    "batch_size": Factor("batch_size", lambda f: _buckets(f["batch_size"], (1, 4, 16, 32, 128))),
    "prefix_cache": Factor("prefix_cache", lambda f: _flag(f["prefix_cache_hit"], "hit", "miss")),
    "preempted": Factor("preempted", lambda f: _flag(f["preempted"], "after a preemption", "not preempted")),
    "chunked_prefill": Factor("chunked_prefill", lambda f: _flag(f["chunked_prefill"], "chunked", "whole")),
    "kv_block": Factor("kv_block", lambda f: _buckets(f["kv_block"], (0, 16, 64, 256, 1024, 4096))),
}
FRAME_COLUMNS = ("sequence", "step", "abs_diff", "position", "batch_size", "prefix_cache_hit", "preempted", "chunked_prefill", "kv_block")


def _schedule_facts(run_dir: Path) -> dict[tuple[int, str], tuple[dict[int, int], bool]]:
    """Per (worker, request id): {completion end position -> engine batch size}, and whether its prompt was
    computed in more than one chunk; from the scheduling records (empty when engine.record_schedule was off)."""
    from rollout_lab.instrument import ScheduleReader, join_schedule

    facts = {}
    for path in sorted((Path(run_dir) / "schedule").glob("worker_*.jsonl")):
        worker = int(path.stem.split("_")[1])
        log = ScheduleReader(path).read_new()
        sizes = {step.step: len(step.requests) for step in log.steps}
        for request_id, ends in join_schedule(log).items():
            facts[(worker, request_id)] = ({end: sizes[entry.step] for end, entry in ends.items()}, ends)
    return facts


def shift_frame(run_dir: Path, run_label: str = "") -> pd.DataFrame:
    """The run's tokens as the shift test reads them (FRAME_COLUMNS); `run_label` prefixes sequence ids."""
    from rollout_lab.records import read_records

    table = read_records(run_dir).select(
        ["step", "worker", "request_id", "position", "prompt_len", "abs_diff", "num_cached_tokens", "num_preemptions", "kv_block", "preemptions_before"]
    ).to_pandas()
    schedule = _schedule_facts(run_dir)
    batch_size, chunked = [], []
    for worker, request_id, prompt_len, position in zip(table["worker"], table["request_id"], table["prompt_len"], table["position"]):
        sizes, ends = schedule.get((int(worker), request_id), ({}, {}))
        batch_size.append(sizes.get(int(prompt_len) + int(position), np.nan))
        chunked.append(any(end < prompt_len for end in ends) if ends else None)
    preempted = table["preemptions_before"].where(table["preemptions_before"].notna(), table["num_preemptions"])
    return pd.DataFrame({
        # A sequence is (step, worker, request): request ids restart with each engine.
        "sequence": run_label + table["step"].astype(str) + "/" + table["worker"].astype(str) + "/" + table["request_id"],
        "step": table["step"].astype(int),
        "abs_diff": table["abs_diff"].astype(float),
        "position": table["position"].astype(float),
        "batch_size": pd.Series(batch_size, dtype=float),
        "prefix_cache_hit": table["num_cached_tokens"].astype(float) > 0,
        "preempted": pd.Series([None if pd.isna(v) else v > 0 for v in preempted], dtype=object),
        "chunked_prefill": pd.Series(chunked, dtype=object),
        "kv_block": table["kv_block"].astype(float),
    })


def condition_counts(frame: pd.DataFrame) -> dict[str, int]:
    """Tokens per condition ('position 8-15': 412), the size a profile states."""
    counts = {}
    for name, factor in FACTORS.items():
        for level, n in factor.levels(frame).value_counts().items():
            counts[f"{name} {level}"] = int(n)
    return counts


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


def _compare(test_fn, name: str, factor: str, level: str, x: pd.DataFrame, y: pd.DataFrame, rng) -> Optional[ConditionTest]:
    if len(x) < MIN_TOKENS or x["sequence"].nunique() < MIN_SEQUENCES or len(y) < MIN_TOKENS:
        return None
    p = test_fn(x["abs_diff"].to_numpy(), x["sequence"].to_numpy(), y["abs_diff"].to_numpy(), y["sequence"].to_numpy(), rng)
    return _summary(name, factor, level, x, y, p)


def shift_test(run: pd.DataFrame, profile: Optional[pd.DataFrame], seed: int = 0, reference_detail: str = "") -> ShiftResult:
    """Every condition of `run` (a shift_frame) against `profile` (a clean shift_frame), or against the run
    itself when profile is None; Holm over the conditions tested."""
    rng = np.random.default_rng(seed)
    tests: list[ConditionTest] = []
    for name, factor in FACTORS.items():
        run_levels = factor.levels(run)
        if profile is not None:
            profile_levels = factor.levels(profile)
            for level in sorted(set(run_levels.dropna())):
                test = _compare(cluster_permutation_test, "sequence permutation of mid-ranks, run vs profile", name, level,
                                run[run_levels == level], profile[profile_levels == level], rng)
                if test is not None:
                    tests.append(test)
            continue
        known = run_levels.notna()
        if name == "all" or run_levels[known].nunique() < 2:
            continue
        for level in sorted(set(run_levels[known])):
            inside, rest = run[known & (run_levels == level)], run[known & (run_levels != level)]
            # A level that splits sequences (position, batch size, KV block) is compared within them.
            split = bool(set(inside["sequence"]) & set(rest["sequence"]))
            test_fn, label = ((paired_signflip_test, "paired sign-flip within sequences, level vs rest of run") if split
                              else (cluster_permutation_test, "sequence permutation of mid-ranks, level vs rest of run"))
            test = _compare(test_fn, label, name, level, inside, rest, rng)
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


# -- the mismatch budget: how much of a run's |difference| each recorded factor explains ------------

# Factors the records cannot separate, and the controlled replay that would measure each.
REPLAY_FACTORS = {
    "trainer self-noise": "re-score the recorded sequences with the trainer twice, at another trainer.micro_batch_size",
    "dtype floor": "replay the recorded requests with engine and trainer in float32 (minimize's replay_case)",
    "batch composition": "re-score each recorded request alone (the hunt's metamorphic oracle) beside its batched logprobs",
}


@dataclass
class BudgetRow:
    """One factor's share of a run's |difference| variance (eta^2, between its levels), or the replay it needs."""

    factor: str
    eta_squared: Optional[float]
    levels: dict[str, float]  # mean |difference| per level
    note: str = ""


def mismatch_budget(frame: pd.DataFrame) -> list[BudgetRow]:
    """Per recorded factor, eta^2 of |difference| across its levels (factors overlap: shares need not add up);
    the factors only a replay can measure, with that replay."""
    total = float(((frame["abs_diff"] - frame["abs_diff"].mean()) ** 2).sum())
    rows = []
    for name, factor in FACTORS.items():
        if name == "all":
            continue
        levels = factor.levels(frame)
        known = frame[levels.notna()].assign(level=levels[levels.notna()])
        if known.empty or known["level"].nunique() < 2 or total == 0:
            rows.append(BudgetRow(name, None, {}, "one level only in this run" if not known.empty else "not recorded"))
            continue
        means = known.groupby("level")["abs_diff"].agg(["mean", "size"])
        between = float((means["size"] * (means["mean"] - known["abs_diff"].mean()) ** 2).sum())
        rows.append(BudgetRow(name, between / total, means["mean"].round(6).to_dict()))
    rows += [BudgetRow(name, None, {}, f"not in the records; measured by: {replay}") for name, replay in REPLAY_FACTORS.items()]
    return rows


def write_budget(frame: pd.DataFrame, out_dir: Path) -> tuple[Path, Path]:
    """mismatch_budget.md (the table) and mismatch_budget.png (the bars) in out_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = mismatch_budget(frame)
    lines = [f"# Mismatch budget: {len(frame)} tokens, mean |difference| {frame['abs_diff'].mean():.4g}", "",
             "| factor | share of variance (eta^2) | mean \\|difference\\| per level |", "| --- | --- | --- |"]
    for row in rows:
        share = f"{row.eta_squared:.3f}" if row.eta_squared is not None else "-"
        lines.append(f"| {row.factor} | {share} | {', '.join(f'{k}: {v:.4g}' for k, v in row.levels.items()) or row.note} |")
    table = Path(out_dir) / "mismatch_budget.md"
    table.write_text("\n".join(lines) + "\n")
    measured = [r for r in rows if r.eta_squared is not None]
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(measured) + 1.2))
    ax.barh([r.factor for r in measured], [r.eta_squared for r in measured])
    ax.set_xlabel("share of |difference| variance explained (eta^2)")
    ax.set_title("mismatch budget (recorded factors)")
    fig.tight_layout()
    plot = Path(out_dir) / "mismatch_budget.png"
    fig.savefig(plot)
    plt.close(fig)
    return table, plot


def main(argv: Optional[list[str]] = None) -> None:
    """`python -m rollout_lab.shift RUN_DIR [--per-step] [--profile P]`: a run dir's shift test, printed."""
    import argparse

    from rollout_lab.records import RecordsError, read_config

    parser = argparse.ArgumentParser(description="Test a run's |sampler - trainer| distribution per condition (docs/shift.md).")
    parser.add_argument("run_dir")
    parser.add_argument("--profile", help="a shift profile file (default: the one matching the run's config; none: the run against itself)")
    parser.add_argument("--per-step", action="store_true", help="test each RL step as a run of its own (how docs/shift.md measures)")
    parser.add_argument("--budget", action="store_true", help="also write mismatch_budget.md and .png into the run dir")
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
    if args.budget:
        print("wrote", *write_budget(run, Path(args.run_dir)))


if __name__ == "__main__":
    main()
