"""What a trial spends its engine passes on (hunt/runner.py): the sequences re-scored alone, checked by
hand without an engine (the batch oracle's noise floor: tests/unit/test_oracles.py)."""

from rollout_lab.hunt.runner import Scored, to_rescore


def item(i, diff=0.0, preempted=0, cached=0, prompt=1):
    return Scored(i, 0, [1] * prompt, [2], [-1.0], preempted, cached, None, reference=[-1.0 - diff])


def test_every_suspicious_sequence_is_rescored_and_only_the_longest_ordinary_one():
    items = [item(0), item(1, cached=16), item(2, preempted=1), item(3, diff=0.5), item(4, prompt=9), item(5, diff=1e-4)]
    # Flagged (3), preempted (2), cached (1), then of the ordinary 0, 4, 5 the longest: 4.
    assert [s.request for s in to_rescore(items, tolerance=1e-3)] == [3, 2, 1, 4]
    many = [item(i, preempted=1) for i in range(12)] + [item(12)]
    assert [s.request for s in to_rescore(many, tolerance=1e-3)] == list(range(8))

