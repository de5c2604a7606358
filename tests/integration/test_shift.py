"""The shift test on real runs: llama-tiny with a bfloat16 engine beside the default float32 trainer. A clean
run's first step is the profile and its second is not shifted against it; then a planted logit_noise below the
spike threshold, weight-sync check on, ends `shifted` (not `sync mismatch`) naming all tokens."""
import pytest

from rollout_lab.loop import run
from rollout_lab.models import cache_dir
from rollout_lab.shift import ShiftProfile, profile_key, profile_path, shift_frame, shift_test, write_profile

# Slow tier (docs/testing.md): two engine starts, a clean run and a faulted one; 231 s on 2 cores under load
# 13-29 (2026-12-07), not timed on an idle machine, so not shown to fit the fast tier's budget.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

COMMON = ("model=llama-tiny", "engine.dtype=bfloat16", "logger.mode=disabled", "workload.max_tokens=16")


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A cache of this test's own (the profile it writes must not reach other runs), the embedded models linked in."""
    models = cache_dir() / "models"
    monkeypatch.setenv("ROLLOUT_LAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models").symlink_to(models)


def test_a_fault_below_the_threshold_is_shifted_and_a_clean_step_is_not(tmp_path, ray_session, compose, private_cache):
    clean_cfg = compose(*COMMON, "loop.steps=2", "loop.check_weight_sync=false")
    clean_cfg.run_dir = str(tmp_path / "clean")
    clean = run(clean_cfg)
    assert clean.status == "ok" and clean.shift.reference == "self", clean.shift.sentence()
    frame = shift_frame(clean_cfg.run_dir)
    # Step 0 is the profile, step 1 a clean run at other prompts (and moved weights) tested against it.
    assert not shift_test(frame[frame.step == 1], frame[frame.step == 0]).shifted
    key = profile_key(clean_cfg)
    write_profile(profile_path(key), ShiftProfile(key, 1, 1, clean.seconds, frame[frame.step == 0]))

    noisy_cfg = compose(*COMMON, "loop.steps=1", "fault=logit_noise", "fault.params.scale=0.1", "workload.prompt_seed=1")
    noisy_cfg.run_dir = str(tmp_path / "noisy")
    noisy = run(noisy_cfg)
    assert noisy.status == "ok" and noisy.abs_diff_max < noisy.spike_threshold, noisy.weight_sync_max_diff
    assert noisy.shift.reference == "profile" and noisy.outcome == "shifted", noisy.shift.sentence()
    # logit_noise moves every token alike: the condition named is all tokens, not a level picked by chance.
    assert noisy.shift.headline.condition == "all tokens" and noisy.shift.headline.effect > 0.53, noisy.shift.sentence()
