"""ddmin and bisection against hand-traced runs: the result and every test, in order."""
import pytest

from rollout_lab.minimize.ddmin import ddmin, smallest_failing


def recording(predicate):
    calls = []

    def fails(candidate):
        calls.append(candidate)
        return predicate(candidate)

    return fails, calls


def test_single_culprit_is_found_by_halving():
    fails, calls = recording(lambda c: 3 in c)
    assert ddmin([1, 2, 3, 4, 5, 6, 7, 8], fails) == [3]
    # n=2: [1..4] fails; n=2: [1,2] passes, [3,4] fails; n=2: [3] fails.
    assert calls == [[1, 2, 3, 4], [1, 2], [3, 4], [3]]


def test_two_distant_culprits_need_complements():
    fails, calls = recording(lambda c: 1 in c and 8 in c)
    assert ddmin([1, 2, 3, 4, 5, 6, 7, 8], fails) == [1, 8]
    assert calls == [
        # n=2: both halves pass (their complements are each other).
        [1, 2, 3, 4], [5, 6, 7, 8],
        # n=4: four quarters pass; removing [1,2] passes, removing [3,4] fails -> n=3.
        [1, 2], [3, 4], [5, 6], [7, 8], [3, 4, 5, 6, 7, 8], [1, 2, 5, 6, 7, 8],
        # n=3 on [1,2,5,6,7,8]: chunks and [5..8] already tested; removing [5,6] fails -> n=2.
        [1, 2, 7, 8],
        # n=2 on [1,2,7,8]: both halves known to pass -> n=4: singletons, then complements.
        [1], [2], [7], [8], [2, 7, 8], [1, 7, 8],
        # n=3 on [1,7,8]: singletons known; [7,8] known to pass; removing 7 fails.
        [1, 8],
        # n=2 on [1,8]: both singletons known to pass, and n == len: 1-minimal.
    ]


def test_result_is_one_minimal_and_keeps_order():
    needed = {"b", "e", "f"}
    result = ddmin(list("abcdefg"), lambda c: needed <= set(c))
    assert result == ["b", "e", "f"]


def test_equal_items_stay_distinct():
    # Fails with at least two 5s: the positions, not the values, are reduced.
    assert ddmin([5, 1, 5, 5, 2], lambda c: c.count(5) >= 2) == [5, 5]


def test_a_single_item_is_not_tested_again():
    fails, calls = recording(lambda c: True)
    assert ddmin(["only"], fails) == ["only"]
    assert calls == []


def test_bisection_finds_the_threshold():
    fails, calls = recording(lambda v: v >= 13)
    assert smallest_failing(1, 32, fails) == 13
    # 16 fails, 8 passes, 12 passes, 14 fails, 13 fails.
    assert calls == [16, 8, 12, 14, 13]


def test_bisection_when_only_high_fails_and_when_low_fails():
    assert smallest_failing(1, 32, lambda v: v == 32) == 32
    assert smallest_failing(1, 32, lambda v: True) == 1
    assert smallest_failing(4, 4, lambda v: True) == 4


def test_bisection_rejects_an_empty_range():
    with pytest.raises(ValueError, match="low=5 is above high=4"):
        smallest_failing(5, 4, lambda v: True)
