"""workload.reward: the choice of reward, and the run's verdict on whether its weight-sync check saw new weights."""
import numpy as np
import pytest

from rollout_lab.__main__ import vacuous_sync_note
from rollout_lab.config import ConfigError, validate
from rollout_lab.mismatch import group_advantages, weight_sync_exercised
from rollout_lab.records import RunResult
from rollout_lab.workload import REWARDS, Problem, even_tokens

PROBLEM = Problem("What is 2 + 3?", 5)


def test_even_tokens_is_the_fraction_of_even_ids_and_ignores_the_text():
    assert even_tokens("anything", [2, 3, 4, 7], PROBLEM) == 0.5
    assert even_tokens(" 5", [0, 10, 48], PROBLEM) == 1.0
    assert even_tokens(" 5", [1], PROBLEM) == 0.0
    assert even_tokens("", [], PROBLEM) == 0.0


def test_math_is_the_default_and_scores_the_text():
    assert REWARDS["math"](" 5", [1, 3], PROBLEM) == 1.0 and REWARDS["math"]("five", [2, 4], PROBLEM) == 0.0


def test_integer_less_samples_give_no_advantage_under_math_but_do_under_even_tokens():
    # Two prompts x two samples of a model that never writes an integer.
    texts, ids, group = ["ab", "cd", "ef", "gh"], [[2, 4], [2, 3], [1, 3], [2, 1]], np.array([0, 0, 1, 1])
    for name, moves in (("math", False), ("even_tokens", True)):
        rewards = np.array([REWARDS[name](t, i, PROBLEM) for t, i in zip(texts, ids)])
        assert bool(np.any(group_advantages(rewards, group))) is moves, name


def test_the_reward_is_checked_at_start(compose):
    validate(compose("workload.reward=even_tokens"))
    assert compose().workload.reward == "math"
    with pytest.raises(ConfigError, match=r"^workload.reward='length' is not valid; choose one of math, even_tokens$"):
        validate(compose("workload.reward=length"))


def test_the_sync_is_exercised_only_when_the_probe_moved_past_the_tolerance_at_some_step():
    assert weight_sync_exercised([], 1e-3) is None
    assert weight_sync_exercised([1.7e-5, 2.5e-5, 2.5e-5], 1e-3) is False
    assert weight_sync_exercised([1e-3], 1e-3) is False
    assert weight_sync_exercised([2e-5, 0.23, 0.1], 1e-3) is True


def _result(exercised, zero_advantage_steps, steps=3):
    return RunResult("r", "d", status="ok", steps_completed=steps, policy_change=2.5e-5,
                     weight_sync_exercised=exercised, zero_advantage_steps=zero_advantage_steps)


def test_the_note_names_zero_advantages_and_the_fix_when_every_step_had_them():
    note = vacuous_sync_note(_result(False, 3))
    assert note.startswith("weight sync check compared unchanged weights") and "\n" not in note
    assert "policy change 2.5e-05" in note and "every GRPO advantage was 0" in note and "workload.reward=even_tokens" in note


def test_the_note_blames_small_updates_when_some_step_had_a_signal():
    note = vacuous_sync_note(_result(False, 1))
    assert "too small" in note and "advantage was 0" not in note


@pytest.mark.parametrize("exercised", [True, None])
def test_no_note_when_the_policy_moved_or_no_check_ran(exercised):
    assert vacuous_sync_note(_result(exercised, 3)) is None
