"""Typed records at the boundaries: what samplers return, and the per-token table on disk.

The token table is Parquet, one file per step under <run_dir>/records/, written atomically,
so a crash mid-run keeps every step written before it. The schema carries its version.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = "1"

TOKEN_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("step", pa.int32()),
        ("worker", pa.int32()),
        ("request_id", pa.string()),
        ("prompt_index", pa.int32()),
        ("sample_index", pa.int32()),
        # Index of the token within the completion (0 = first sampled token).
        ("position", pa.int32()),
        ("prompt_len", pa.int32()),
        ("token_id", pa.int32()),
        ("sampler_logprob", pa.float64()),
        ("trainer_logprob", pa.float64()),
        ("abs_diff", pa.float64()),
        ("reward", pa.float64()),
        # Engine facts for the request, as vLLM reports them.
        ("num_cached_tokens", pa.int32()),
        ("num_preemptions", pa.int32()),
        # Filled by the scheduling instrumentation when it is on (null otherwise).
        ("kv_block", pa.int32()),
        ("state_slot", pa.int32()),
        ("preemptions_before", pa.int32()),
    ],
    metadata={"rollout_lab.schema_version": SCHEMA_VERSION},
)


class RecordsError(ValueError):
    """A records directory or file that cannot be read as rollout_lab records."""


@dataclass
class Sample:
    """One completion from a sampler worker, with everything the engine told us about it."""

    prompt_index: int
    sample_index: int
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    sampler_logprobs: list[float]
    num_cached_tokens: int
    num_preemptions: int
    finish_reason: Optional[str]
    text: str
    kv_blocks: Optional[list[int]] = None
    state_slots: Optional[list[int]] = None
    preemptions_before: Optional[list[int]] = None


@dataclass
class RolloutBatch:
    """What one worker produced in one step."""

    step: int
    worker: int
    samples: list[Sample]
    engine_stats: dict[str, float] = field(default_factory=dict)


def token_table(
    run_id: str,
    batch: RolloutBatch,
    trainer_logprobs: list[np.ndarray],
    rewards: list[float],
) -> pa.Table:
    """Flatten a batch and the trainer's recomputed logprobs into per-token rows."""
    columns: dict[str, list] = {name: [] for name in TOKEN_SCHEMA.names}
    for sample, trainer_lp, reward in zip(batch.samples, trainer_logprobs, rewards, strict=True):
        n = len(sample.token_ids)
        if len(trainer_lp) != n or len(sample.sampler_logprobs) != n:
            raise ValueError(f"request {sample.request_id}: {n} tokens but logprob lengths differ")
        columns["run_id"] += [run_id] * n
        columns["step"] += [batch.step] * n
        columns["worker"] += [batch.worker] * n
        columns["request_id"] += [sample.request_id] * n
        columns["prompt_index"] += [sample.prompt_index] * n
        columns["sample_index"] += [sample.sample_index] * n
        columns["position"] += list(range(n))
        columns["prompt_len"] += [len(sample.prompt_token_ids)] * n
        columns["token_id"] += sample.token_ids
        columns["sampler_logprob"] += sample.sampler_logprobs
        columns["trainer_logprob"] += [float(x) for x in trainer_lp]
        columns["abs_diff"] += [abs(a - float(b)) for a, b in zip(sample.sampler_logprobs, trainer_lp)]
        columns["reward"] += [reward] * n
        columns["num_cached_tokens"] += [sample.num_cached_tokens] * n
        columns["num_preemptions"] += [sample.num_preemptions] * n
        for column, values in [
            ("kv_block", sample.kv_blocks),
            ("state_slot", sample.state_slots),
            ("preemptions_before", sample.preemptions_before),
        ]:
            columns[column] += list(values) if values is not None else [None] * n
    return pa.table(columns, schema=TOKEN_SCHEMA)


def write_step(run_dir: Path, step: int, table: pa.Table) -> Path:
    """Write one step's rows atomically: a reader never sees a half-written file."""
    out_dir = Path(run_dir) / "records"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"step_{step:05d}.parquet"
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def read_records(run_dir: Path) -> pa.Table:
    """All token rows of a run; raises RecordsError naming the missing dir or the bad file."""
    records_dir = Path(run_dir) / "records"
    if not Path(run_dir).is_dir():
        raise RecordsError(f"run dir {run_dir} does not exist")
    if not records_dir.is_dir():
        raise RecordsError(f"run dir {run_dir} has no records/ directory")
    tables = []
    for path in sorted(records_dir.glob("step_*.parquet")):
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise RecordsError(f"records file {path} is corrupted: {type(exc).__name__}: {exc}") from None
        version = (table.schema.metadata or {}).get(b"rollout_lab.schema_version", b"?").decode()
        if version != SCHEMA_VERSION:
            raise RecordsError(f"records file {path} has schema version {version}, expected {SCHEMA_VERSION}")
        tables.append(table)
    if not tables:
        return TOKEN_SCHEMA.empty_table()
    return pa.concat_tables(tables)
