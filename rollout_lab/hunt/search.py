"""Coverage-guided search: which engine configuration and workloads to try next.

Random search scored by coverage, like a greybox fuzzer scoring inputs by new edges: of
`candidates` random points, the one that exercises the most values and pairs of values not yet
tried wins. With probability `exploit`, the next engine is instead a neighbour of a failing one
(one knob changed, to its least-tried value) and its first workload is the failing workload with
a new seed: more trials near failures. Everything is drawn from Random(f"{seed}:{group index}"),
so the same hunt seed and the same history propose the same trials (a resumed hunt rebuilds the
history from its store).
"""
from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

from rollout_lab.hunt.space import Space, point_key


def _value(v) -> str:
    return json.dumps(v)


class Coverage:
    """How often each value of each dimension, and each pair of them, has been exercised."""

    def __init__(self, dims: dict[str, list]):
        self.dims = dims
        self.singles: Counter = Counter()
        self.pairs: Counter = Counter()

    @staticmethod
    def _items(point: dict) -> list[tuple[str, str]]:
        return sorted((k, _value(v)) for k, v in point.items() if k != "seed")

    def record(self, point: dict) -> None:
        items = self._items(point)
        self.singles.update(items)
        self.pairs.update(itertools.combinations(items, 2))

    def novelty(self, point: dict, extra: "Counter | None" = None) -> int:
        """2 per value never tried plus 1 per pair never tried (`extra` counts as tried)."""
        items = self._items(point)
        extra = extra or Counter()
        new_singles = sum(1 for i in items if not self.singles[i] and not extra[i])
        new_pairs = sum(1 for p in itertools.combinations(items, 2) if not self.pairs[p] and not extra[p])
        return 2 * new_singles + new_pairs

    def totals(self) -> tuple[int, int]:
        """How many values and pairs of values the space has."""
        sizes = [len(v) for v in self.dims.values()]
        return sum(sizes), sum(a * b for a, b in itertools.combinations(sizes, 2))

    def covered(self) -> tuple[int, int]:
        """How many values and pairs of the space have been exercised."""
        known = {(k, _value(v)) for k, values in self.dims.items() for v in values}
        singles = sum(1 for i in self.singles if i in known)
        pairs = sum(1 for a, b in self.pairs if a in known and b in known and a[0] != b[0])
        return singles, pairs

    def fractions(self) -> tuple[float, float]:
        (s, p), (ts, tp) = self.covered(), self.totals()
        return s / max(ts, 1), p / max(tp, 1)

    def untried(self) -> dict[str, list]:
        """Per dimension, the values never exercised."""
        return {k: [v for v in values if not self.singles[(k, _value(v))]] for k, values in self.dims.items()}


@dataclass
class Group:
    """One engine configuration and the workloads to try on it."""

    index: int
    engine: dict
    workloads: list[dict] = field(default_factory=list)
    # Why this engine was chosen: "explore" (coverage), "exploit:<trial key>" or "rest after a crash".
    reason: str = "explore"

    @property
    def key(self) -> str:
        return point_key(self.engine)

    def trial_key(self, workload: dict) -> str:
        return point_key(self.engine, workload)


class Planner:
    def __init__(self, space: Space, seed: int, candidates: int = 48, exploit: float = 0.3,
                 valid_workload: Optional[Callable[[dict], bool]] = None):
        self.space, self.seed, self.candidates, self.exploit = space, seed, candidates, exploit
        # Workload points vLLM would refuse (e.g. n > 1 with greedy sampling) are not proposed.
        self.valid_workload = valid_workload or (lambda point: True)

    def rng(self, group_index: int) -> random.Random:
        return random.Random(f"{self.seed}:{group_index}")

    @staticmethod
    def _draw(rng: random.Random, dims: dict[str, list]) -> dict:
        return {k: rng.choice(values) for k, values in dims.items()}

    def _best(self, rng: random.Random, dims: dict[str, list], coverage: Coverage, base: dict, extra: Counter,
              avoid: set[str], valid: Callable[[dict], bool] = lambda point: True) -> dict:
        """Of `candidates` random points (merged with `base` for scoring), the most novel valid one not in `avoid`."""
        best, best_score = None, -1
        for _ in range(self.candidates):
            point = self._draw(rng, dims)
            if point_key(point) in avoid or not valid(point):
                continue
            score = coverage.novelty(base | point, extra)
            if score > best_score:
                best, best_score = point, score
        return best if best is not None else self._draw(rng, dims)

    def _neighbour(self, rng: random.Random, engine: dict, coverage: Coverage, avoid: set[str],
                   valid: Callable[[dict], bool]) -> dict:
        """The engine point with one knob changed, to the value tried least often (a valid one)."""
        dims = self.space.engine_dims()
        for _ in range(self.candidates):
            dim = rng.choice([d for d, values in dims.items() if len(values) > 1])
            others = [v for v in dims[dim] if v != engine.get(dim)]
            value = min(others, key=lambda v: (coverage.singles[(dim, _value(v))], rng.random()))
            point = engine | {dim: value}
            if point_key(point) not in avoid and valid(point):
                return point
        return self._best(rng, dims, coverage, {}, Counter(), avoid, valid)

    def next_group(self, index: int, coverage: Coverage, num_workloads: int, failing: list[tuple[dict, dict]] = (),
                   avoid: set[str] = frozenset(), valid_engine: Callable[[dict], bool] = lambda point: True) -> Group:
        """The group-th engine configuration and its workloads.

        failing: (engine point, workload point) of failing trials, oldest first; avoid: engine
        keys not to propose again (rejected configurations); valid_engine: whether an engine point
        may be drawn (constraints.Learned.allows: not one vLLM is known to refuse).
        """
        rng = self.rng(index)
        group = Group(index, {})
        first_workload = None
        if failing and rng.random() < self.exploit:
            engine, workload = failing[rng.randrange(len(failing))]
            group.engine = self._neighbour(rng, engine, coverage, set(avoid), valid_engine)
            group.reason = f"exploit:{point_key(engine, workload)}"
            first_workload = workload | {"seed": rng.randrange(2**31)}
        else:
            group.engine = self._best(rng, self.space.engine_dims(), coverage, {}, Counter(), set(avoid), valid_engine)
        extra: Counter = Counter()
        while len(group.workloads) < num_workloads:
            if first_workload is not None and not group.workloads:
                workload = first_workload
            else:
                workload = self._best(rng, self.space.workload_dims(), coverage, group.engine, extra, set(),
                                      self.valid_workload)
                workload["seed"] = rng.randrange(2**31)
            group.workloads.append(workload)
            items = Coverage._items(group.engine | workload)
            extra.update(items)
            extra.update(itertools.combinations(items, 2))
        return group
