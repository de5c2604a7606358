"""Reduction algorithms, pure: Zeller's ddmin over a list, and bisection over an integer.

`fails(candidate)` is the test: True when the candidate still shows the failure. Both take a
known-failing input and return a failing one that is smaller or equal.
"""
from __future__ import annotations

from typing import Callable, Sequence, TypeVar

T = TypeVar("T")


def _chunks(items: list[int], n: int) -> list[list[int]]:
    """`items` cut into n contiguous pieces whose sizes differ by at most one."""
    bounds = [len(items) * i // n for i in range(n + 1)]
    return [items[bounds[i] : bounds[i + 1]] for i in range(n)]


def ddmin(items: Sequence[T], fails: Callable[[list[T]], bool]) -> list[T]:
    """A 1-minimal failing sublist of `items` (Zeller and Hildebrandt 2002); `items` must fail.

    Each distinct sublist is tested at most once; the order of items is kept.
    """
    # Work on positions, so equal items stay distinct and a tested sublist has a plain key.
    current = list(range(len(items)))
    seen: dict[tuple[int, ...], bool] = {}

    def test(positions: list[int]) -> bool:
        key = tuple(positions)
        if key not in seen:
            seen[key] = fails([items[i] for i in positions])
        return seen[key]

    n = 2
    while len(current) >= 2:
        chunks = _chunks(current, n)
        subset = next((c for c in chunks if test(c)), None)
        if subset is not None:
            current, n = subset, 2
            continue
        # With two chunks each complement is the other chunk, already tested.
        complements = [] if n == 2 else [
            [p for j, chunk in enumerate(chunks) if j != i for p in chunk] for i in range(n)
        ]
        complement = next((c for c in complements if test(c)), None)
        if complement is not None:
            current, n = complement, max(n - 1, 2)
            continue
        if n >= len(current):
            break
        n = min(len(current), 2 * n)
    return [items[i] for i in current]


def smallest_failing(low: int, high: int, fails: Callable[[int], bool]) -> int:
    """The smallest value in [low, high] that fails, by bisection; `high` must fail.

    Exact when failing is monotone in the value; otherwise still a failing value.
    """
    if low > high:
        raise ValueError(f"low={low} is above high={high}")
    while low < high:
        middle = (low + high) // 2
        if fails(middle):
            high = middle
        else:
            low = middle + 1
    return high
