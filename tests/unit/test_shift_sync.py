"""The weight-sync check beside an engine perturbation below the spike threshold (docs/shift.md, "The weight-sync check")."""
from types import SimpleNamespace

import pytest

from rollout_lab.loop import WeightSyncError, check_sync


def _job(tolerance: float):
    return SimpleNamespace(cfg=SimpleNamespace(loop=SimpleNamespace(check_weight_sync=True)), sync_tolerance=tolerance)


def test_a_probe_as_far_off_as_the_steps_own_tokens_is_the_engines_error_not_the_syncs():
    # bfloat16 kv_noise 0.03 (docs/shift.md): the probe 0.553 off, the step's sampled tokens up to 1.03 off
    check_sync(_job(0.5), 0, {"sync/max_abs_diff": 0.553, "abs_diff_max": 1.03})


def test_a_probe_further_off_than_the_tolerance_and_the_steps_tokens_is_a_sync_mismatch():
    with pytest.raises(WeightSyncError, match=r"0\.9 > 0\.5"):
        check_sync(_job(0.5), 2, {"sync/max_abs_diff": 0.9, "abs_diff_max": 0.26})
    with pytest.raises(WeightSyncError, match=r"> 0\.001"):  # float32: clean tokens agree to ~7e-5
        check_sync(_job(1e-3), 0, {"sync/max_abs_diff": 0.02, "abs_diff_max": 6.6e-5})
