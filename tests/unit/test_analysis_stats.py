"""The sweep statistics' building blocks, against hand-computed expectations."""
import numpy as np
import pytest

from rollout_lab.analysis.signature import flatten
from rollout_lab.analysis.stats import bin_codes, holm, stratified_rank_test


def test_holm_adjusts_in_input_order_and_stays_monotone():
    # Sorted: 0.01*4=0.04, 0.02*3=0.06, 0.03*2=0.06 (monotone), 0.04*1 -> 0.06.
    assert holm([0.04, 0.01, 0.03, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_bin_codes_keeps_few_values_and_bins_many():
    codes, labels = bin_codes(np.array([5, 3, 5, 9]))
    assert codes.tolist() == [1, 0, 1, 2] and labels == ["3", "5", "9"]
    # 0..31 into 4 equal-width bins of 8 values each.
    codes, labels = bin_codes(np.arange(32), max_bins=4)
    assert codes.tolist() == [0] * 8 + [1] * 8 + [2] * 8 + [3] * 8
    assert labels == ["0-7", "8-15", "16-23", "24-31"]


def test_stratified_rank_test_sees_where_high_ranks_sit_not_how_many_tokens():
    rng = np.random.default_rng(0)
    n = 200
    category = np.repeat([0, 1], n)
    # Group 0's large differences sit in category 0, group 1's in category 1.
    rank = np.concatenate([rng.uniform(0.5, 1, n // 2), rng.uniform(0, 0.5, n // 2), rng.uniform(0, 0.5, n // 2), rng.uniform(0.5, 1, n // 2)])
    group = np.concatenate([np.zeros(n // 2), np.ones(n // 2), np.zeros(n // 2), np.ones(n // 2)]).astype(int)
    statistic, p, eta2 = stratified_rank_test(rank, group, category, rng)
    assert p < 0.01 and eta2 > 0.5

    # Same rank distribution everywhere, but group 1 holds most of category 1: no move.
    rank = rng.uniform(0, 1, 2 * n)
    group = np.concatenate([np.zeros(n, int), (rng.uniform(size=n) < 0.9).astype(int)])
    statistic, p, eta2 = stratified_rank_test(rank, group, category, rng)
    assert p > 0.05 and eta2 < 0.02


def test_flatten_turns_nested_config_into_dotted_keys():
    assert flatten({"engine": {"dtype": "float32", "block_size": None}, "fault": {"name": None, "params": {}}, "run_name": "x"}) == {
        "engine.dtype": "float32",
        "engine.block_size": None,
        "fault.name": None,
        "fault.params": {},
        "run_name": "x",
    }
