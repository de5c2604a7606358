import math

import numpy as np
import pytest

from rollout_lab.mismatch import group_advantages, token_metrics


def test_metrics_match_hand_computation():
    sampler = np.array([-1.0, -2.0, -0.5])
    trainer = np.array([-1.0, -1.5, -0.7])
    m = token_metrics(sampler, trainer, np.array([0, 0, 1]), spike_threshold=0.3)
    # log_ratio = trainer - sampler = [0, 0.5, -0.2]
    assert m["num_tokens"] == 3
    assert m["abs_diff_mean"] == pytest.approx(0.7 / 3)
    assert m["abs_diff_max"] == pytest.approx(0.5)
    assert m["kl_k1"] == pytest.approx(-(0.5 - 0.2) / 3)
    assert m["kl_k2"] == pytest.approx((0.25 + 0.04) / 6)
    k3 = (0.0 + (math.exp(0.5) - 1 - 0.5) + (math.exp(-0.2) - 1 + 0.2)) / 3
    assert m["kl_k3"] == pytest.approx(k3)
    assert m["importance_ratio_min"] == pytest.approx(math.exp(-0.2))
    assert m["importance_ratio_max"] == pytest.approx(math.exp(0.5))
    assert m["importance_ratio_mean"] == pytest.approx((1 + math.exp(0.5) + math.exp(-0.2)) / 3)
    assert m["spike_fraction"] == pytest.approx(1 / 3)
    assert m["num_spikes"] == 1
    # Sequence 0 max is 0.5, sequence 1 max is 0.2.
    assert m["sequence_max_mean"] == pytest.approx(0.35)
    assert m["sequences_with_spike_fraction"] == pytest.approx(0.5)
    assert m["bitwise_equal_fraction"] == pytest.approx(1 / 3)


def test_identical_logprobs_have_zero_divergence():
    lp = np.array([-0.1, -3.0, -7.5])
    m = token_metrics(lp, lp, np.array([0, 1, 2]), spike_threshold=1e-3)
    assert m["abs_diff_max"] == 0.0
    assert m["kl_k1"] == m["kl_k2"] == m["kl_k3"] == 0.0
    assert m["importance_ratio_min"] == m["importance_ratio_max"] == 1.0
    assert m["spike_fraction"] == 0.0
    assert m["bitwise_equal_fraction"] == 1.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differs"):
        token_metrics(np.zeros(2), np.zeros(3), np.zeros(2), 0.1)


def test_group_advantages_standardize_within_prompt():
    adv = group_advantages(np.array([1.0, 0.0, 0.5, 0.5]), np.array([0, 0, 1, 1]), eps=0.0)
    assert adv[:2] == pytest.approx([1.0, -1.0])
    # A group with equal rewards carries no signal.
    assert np.all(adv[2:] == 0.0)
