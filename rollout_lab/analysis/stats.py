"""The statistics the sweep verdict (verdict.py) and the shift check rest on, free of either: Holm's
adjustment, Cramer's V, binning a location feature, and the stratified rank permutation test."""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

PERMUTATIONS = 999
# Location features with more distinct values are cut into this many equal-width bins.
MAX_BINS = 8


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order."""
    order = np.argsort(p_values)
    adjusted = np.empty(len(p_values))
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted.tolist()


def cramers_v(table: np.ndarray) -> float:
    """Cramer's V of a contingency table (rows and columns that are all zero dropped); 0 below 2x2."""
    table = table[table.sum(axis=1) > 0][:, table.sum(axis=0) > 0]
    if min(table.shape) < 2:
        return 0.0
    chi2 = stats.chi2_contingency(table, correction=False)[0]
    return float(math.sqrt(chi2 / (table.sum() * (min(table.shape) - 1))))


def bin_codes(values: np.ndarray, max_bins: int = MAX_BINS) -> tuple[np.ndarray, list[str]]:
    """Integer categories and their labels: the values themselves when few, else equal-width bins."""
    distinct = np.unique(values)
    if distinct.size <= max_bins:
        return np.searchsorted(distinct, values), [str(v) for v in distinct]
    edges = np.linspace(values.min(), values.max() + 1, max_bins + 1)
    codes = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, max_bins - 1)
    bounds = np.ceil(edges).astype(int)
    return codes, [f"{lo}-{hi - 1}" for lo, hi in zip(bounds[:-1], bounds[1:])]


def stratified_rank_test(rank: np.ndarray, group: np.ndarray, category: np.ndarray, rng: np.random.Generator) -> tuple[float, float, float]:
    """Do ranks differ between groups within categories? (between-group SS, permutation p, eta^2).

    Group labels are shuffled within each category, which keeps every group's count per
    category, so only where in the rank order a group's tokens sit can make the statistic large.
    """
    order = np.argsort(category, kind="stable")
    rank, group, category = rank[order], group[order], category[order]
    _, category = np.unique(category, return_inverse=True)
    _, group = np.unique(group, return_inverse=True)
    n_groups, n_categories = group.max() + 1, category.max() + 1
    cells = np.bincount(group * n_categories + category, minlength=n_groups * n_categories).astype(float)
    category_sum = np.bincount(category, weights=rank, minlength=n_categories)
    category_n = np.bincount(category, minlength=n_categories)
    # SS_between = sum over cells of S^2/n minus sum over categories of S^2/n; the second is fixed.
    fixed = np.sum(category_sum**2 / np.maximum(category_n, 1))

    def between(groups: np.ndarray) -> np.ndarray:
        rows = groups.shape[0]
        index = groups * n_categories + category + (np.arange(rows) * n_groups * n_categories)[:, None]
        sums = np.bincount(index.ravel(), weights=np.tile(rank, rows), minlength=rows * n_groups * n_categories)
        sums = sums.reshape(rows, n_groups * n_categories)
        return np.sum(sums**2 / np.maximum(cells, 1), axis=1) - fixed

    observed = float(between(group[None, :])[0])
    exceed, chunk = 0, 100
    for start in range(0, PERMUTATIONS, chunk):
        rows = min(chunk, PERMUTATIONS - start)
        # Sorting random keys offset by the category shuffles labels within each category block.
        shuffled = np.argsort(rng.random((rows, rank.size)) + category[None, :], axis=1)
        exceed += int(np.sum(between(group[shuffled]) >= observed - 1e-12))
    total = float(np.sum((rank - rank.mean()) ** 2))
    return observed, (1 + exceed) / (1 + PERMUTATIONS), observed / total if total > 0 else 0.0
