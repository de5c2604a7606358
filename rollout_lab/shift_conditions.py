"""What a token was sampled in: the recorded conditions the shift test and the mismatch budget cut a run by.

    run dir (records/, schedule/)  --shift_frame-->  one row per token (FRAME_COLUMNS): its sequence, its prompt,
                                                     |difference| and the facts FACTORS turn into levels
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd


def _buckets(values: pd.Series, edges: tuple[int, ...]) -> pd.Series:
    """'8-15', '16-31', '128+' labels of integer values cut at edges (NaN stays unknown)."""
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(edges, edges[1:])] + [f"{edges[-1]}+"]
    codes = np.searchsorted(np.asarray(edges), values.to_numpy(dtype=float), side="right") - 1
    out = pd.Series([labels[c] if c >= 0 else None for c in codes], index=values.index, dtype=object)
    out[values.isna()] = None
    return out


def _flag(values: pd.Series, yes: str, no: str) -> pd.Series:
    out = pd.Series(np.where(values.fillna(False).astype(bool), yes, no), index=values.index, dtype=object)
    out[values.isna()] = None
    return out


@dataclass(frozen=True)
class Factor:
    """One recorded condition a token can be in, as labels of its levels (None: not recorded)."""

    name: str
    levels: Callable[[pd.DataFrame], pd.Series]
    # What the profile test permutes between run and profile: "prompt" where a token's noise is its prompt's
    # business; "batch" (one engine's step of the RL loop: every prompt of it in the same engine batches) where
    # the level is the scheduler's choice for the whole batch and changes its arithmetic (bfloat16 kernels round
    # by batch shape), so the prompts of one run are not exchangeable with the profile's there.
    unit: str = "prompt"


# The conditions tested, each a factor whose levels cut the tokens. One table: adding one is a line here
# (and, if it needs a fact the records do not carry, a column in shift_frame).
FACTORS = {
    "all": Factor("all", lambda f: pd.Series("tokens", index=f.index, dtype=object)),
    "position": Factor("position", lambda f: _buckets(f["position"], (0, 8, 16, 32, 128, 512))),
    "batch_size": Factor("batch_size", lambda f: _buckets(f["batch_size"], (1, 4, 16, 32, 128)), unit="batch"),
    "prefix_cache": Factor("prefix_cache", lambda f: _flag(f["prefix_cache_hit"], "hit", "miss")),
    "preempted": Factor("preempted", lambda f: _flag(f["preempted"], "after a preemption", "not preempted")),
    "chunked_prefill": Factor("chunked_prefill", lambda f: _flag(f["chunked_prefill"], "chunked", "whole"), unit="batch"),
    "kv_block": Factor("kv_block", lambda f: _buckets(f["kv_block"], (0, 16, 64, 256, 1024, 4096))),
}
FRAME_COLUMNS = ("sequence", "prompt", "step", "abs_diff", "position", "batch_size", "prefix_cache_hit", "preempted", "chunked_prefill", "kv_block")


def units(frame: pd.DataFrame, unit: str) -> pd.Series:
    """Each token's permutation unit: its prompt ("<run>/<step>/<worker>/<prompt index>", shift_frame's
    id) or that prompt's engine batch group (the id without its prompt index)."""
    return frame["prompt"] if unit == "prompt" else frame["prompt"].str.rsplit("/", n=1).str[0]


def _schedule_facts(run_dir: Path) -> dict[tuple[int, str], tuple[dict[int, int], bool]]:
    """Per (worker, request id): {completion end position -> engine batch size}, and whether its prompt was
    computed in more than one chunk; from the scheduling records (empty when engine.record_schedule was off)."""
    from rollout_lab.instrument import ScheduleReader, join_schedule

    facts = {}
    for path in sorted((Path(run_dir) / "schedule").glob("worker_*.jsonl")):
        worker = int(path.stem.split("_")[1])
        log = ScheduleReader(path).read_new()
        sizes = {step.step: len(step.requests) for step in log.steps}
        for request_id, ends in join_schedule(log).items():
            facts[(worker, request_id)] = ({end: sizes[entry.step] for end, entry in ends.items()}, ends)
    return facts


def shift_frame(run_dir: Path, run_label: str = "") -> pd.DataFrame:
    """The run's tokens as the shift test reads them (FRAME_COLUMNS); `run_label` prefixes sequence ids."""
    from rollout_lab.records import read_records

    table = read_records(run_dir).select(
        ["step", "worker", "request_id", "prompt_index", "position", "prompt_len", "abs_diff", "num_cached_tokens", "num_preemptions", "kv_block", "preemptions_before"]
    ).to_pandas()
    schedule = _schedule_facts(run_dir)
    batch_size, chunked = [], []
    for worker, request_id, prompt_len, position in zip(table["worker"], table["request_id"], table["prompt_len"], table["position"]):
        sizes, ends = schedule.get((int(worker), request_id), ({}, {}))
        batch_size.append(sizes.get(int(prompt_len) + int(position), np.nan))
        chunked.append(any(end < prompt_len for end in ends) if ends else None)
    preempted = table["preemptions_before"].where(table["preemptions_before"].notna(), table["num_preemptions"])
    return pd.DataFrame({
        # A sequence is (step, worker, request): request ids restart with each engine.
        "sequence": run_label + table["step"].astype(str) + "/" + table["worker"].astype(str) + "/" + table["request_id"],
        # The unit the profile test permutes: a prompt's samples share its prompt and its KV blocks (prefix
        # caching), so they are not independent of each other.
        "prompt": run_label + table["step"].astype(str) + "/" + table["worker"].astype(str) + "/" + table["prompt_index"].astype(str),
        "step": table["step"].astype(int),
        "abs_diff": table["abs_diff"].astype(float),
        "position": table["position"].astype(float),
        "batch_size": pd.Series(batch_size, dtype=float),
        "prefix_cache_hit": table["num_cached_tokens"].astype(float) > 0,
        "preempted": pd.Series([None if pd.isna(v) else v > 0 for v in preempted], dtype=object),
        "chunked_prefill": pd.Series(chunked, dtype=object),
        "kv_block": table["kv_block"].astype(float),
    })


def condition_counts(frame: pd.DataFrame) -> dict[str, int]:
    """Tokens per condition ('position 8-15': 412), the size a profile states."""
    counts = {}
    for name, factor in FACTORS.items():
        for level, n in factor.levels(frame).value_counts().items():
            counts[f"{name} {level}"] = int(n)
    return counts
