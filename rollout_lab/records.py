"""The run dir, typed: what samplers return, and every file a run leaves that a later stage reads.

    <run_dir>/config.json              RunConfig, resolved        write_config / read_config
    <run_dir>/requests/step_N.parquet  SampledRequest per request  write_requests / read_requests
    <run_dir>/records/step_N.parquet   one row per sampled token   write_step / read_records
    <run_dir>/summary.json             RunResult                   write_summary / read_summary

The per-step tables are Parquet, written atomically, so a crash mid-run keeps every step written
before it; their schemas carry a version. Every reader raises RecordsError with one line naming
the file and what is wrong with it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rollout_lab.config import ConfigError, RunConfig, validate
from rollout_lab.crash import CrashSignature
from rollout_lab.shift_result import ShiftResult


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
    # None: this vLLM keeps no per-request count (compat.preemptions_of), which is unknown, not 0.
    num_preemptions: Optional[int]
    finish_reason: Optional[str]
    text: str
    kv_blocks: Optional[list[int]] = None
    state_slots: Optional[list[int]] = None
    preemptions_before: Optional[list[int]] = None


@dataclass
class SampledRequest:
    """One request exactly as a sampler sent it to its engine: the prompt, the seed, the sampling params."""

    step: int
    worker: int
    # vLLM's id for the request; None when the engine raised before returning any output.
    request_id: Optional[str]
    prompt_index: int
    sample_index: int
    prompt_token_ids: list[int]
    # None: sampled from the engine's own RNG (engine.seed_policy=engine), seeded with engine.seed.
    seed: Optional[int]
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    logprobs: int
    # The tensor-parallel size of the engine that served it (rollout_lab/placement.py); 1 in run
    # dirs written before it was recorded.
    tp_size: int = 1


REQUEST_SCHEMA = pa.schema(
    [
        ("step", pa.int32()),
        ("worker", pa.int32()),
        ("request_id", pa.string()),
        ("prompt_index", pa.int32()),
        ("sample_index", pa.int32()),
        ("prompt_token_ids", pa.list_(pa.int32())),
        ("seed", pa.int64()),
        ("n", pa.int32()),
        ("max_tokens", pa.int32()),
        ("temperature", pa.float64()),
        ("top_p", pa.float64()),
        ("top_k", pa.int32()),
        ("logprobs", pa.int32()),
        ("tp_size", pa.int32()),
    ],
    metadata={"rollout_lab.schema_version": SCHEMA_VERSION},
)


@dataclass
class RolloutBatch:
    """What one worker produced in one step, and the requests it sent for it."""

    step: int
    worker: int
    samples: list[Sample]
    engine_stats: dict[str, float] = field(default_factory=dict)
    requests: list[SampledRequest] = field(default_factory=list)


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


def _write_table(run_dir: Path, folder: str, step: int, table: pa.Table) -> Path:
    """One step's table, written atomically: a reader never sees a half-written file."""
    out_dir = Path(run_dir) / folder
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"step_{step:05d}.parquet"
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def _read_tables(run_dir: Path, folder: str, schema: pa.Schema, what: str, pattern: str = "step_*.parquet") -> pa.Table:
    """The step files of <run_dir>/<folder>/ as one table; RecordsError names a missing dir or a bad file."""
    if not Path(run_dir).is_dir():
        raise RecordsError(f"run dir {run_dir} does not exist")
    table_dir = Path(run_dir) / folder
    if not table_dir.is_dir():
        raise RecordsError(f"run dir {run_dir} has no {folder}/ directory")
    tables = []
    for path in sorted(table_dir.glob(pattern)):
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise RecordsError(f"{what} file {path} is corrupted: {type(exc).__name__}: {exc}") from None
        version = (table.schema.metadata or {}).get(b"rollout_lab.schema_version", b"?").decode()
        if version != SCHEMA_VERSION:
            raise RecordsError(f"{what} file {path} has schema version {version}, expected {SCHEMA_VERSION}")
        tables.append(table)
    return pa.concat_tables(tables) if tables else schema.empty_table()


def write_step(run_dir: Path, step: int, table: pa.Table) -> Path:
    """Write one step's token rows to <run_dir>/records/, atomically."""
    return _write_table(run_dir, "records", step, table)


def read_records(run_dir: Path) -> pa.Table:
    """All token rows of a run; raises RecordsError naming the missing dir or the bad file."""
    return _read_tables(run_dir, "records", TOKEN_SCHEMA, "records")


def write_requests(run_dir: Path, step: int, requests: list[SampledRequest]) -> Path:
    """Write the requests one step sent to its engines to <run_dir>/requests/, atomically."""
    columns = {name: [getattr(r, name) for r in requests] for name in REQUEST_SCHEMA.names}
    return _write_table(run_dir, "requests", step, pa.table(columns, schema=REQUEST_SCHEMA))


def read_requests(run_dir: Path, step: Optional[int] = None) -> list[SampledRequest]:
    """The requests a run sent to its engines (of one step, if given), in the order they were sent.

    Run dirs written before requests were recorded have no requests/ directory: RecordsError says so.
    """
    pattern = "step_*.parquet" if step is None else f"step_{step:05d}.parquet"
    table = _read_tables(run_dir, "requests", REQUEST_SCHEMA, "requests", pattern)
    if step is not None and table.num_rows == 0:
        raise RecordsError(f"run dir {run_dir} recorded no requests for step {step}")
    return [SampledRequest(**row) for row in table.to_pylist()]


def write_config(run_dir: Path, cfg: RunConfig) -> dict:
    """<run_dir>/config.json: the resolved config; returns it as the plain dict that was written."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    (Path(run_dir) / "config.json").write_text(json.dumps(config, indent=2))
    return config


def read_config(run_dir: Path) -> RunConfig:
    """The run's resolved config (config.json) as a validated RunConfig."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(run_dir) / "config.json"
    data = _read_json(path)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), data)
        return validate(OmegaConf.to_object(merged))
    except (OmegaConfBaseException, ConfigError) as exc:
        raise RecordsError(f"{path} is not a valid rollout_lab config: {exc}".splitlines()[0]) from None


# What RunResult.status takes: interrupted is a run stopped before its last step (records kept).
STATUSES = ("ok", "crash", "sync_mismatch", "interrupted")


@dataclass
class RunResult:
    """What a finished (or crashed) run reports: <run_dir>/summary.json (write_summary, read_summary)."""

    run_id: str
    run_dir: str
    status: str = "interrupted"
    # How it ended, as the sweep analysis classes runs (analysis/outcome.py): clean, silent mismatch, shifted,
    # sync mismatch, crash; "" for an interrupted run or a summary written before it was recorded.
    outcome: str = ""
    steps_completed: int = 0
    num_tokens: int = 0
    abs_diff_max: float = 0.0
    abs_diff_mean: float = 0.0
    spike_fraction: float = 0.0
    # Share of tokens whose sampler and trainer logprobs are bitwise equal (1.0: truly on-policy).
    bitwise_equal_fraction: float = 0.0
    # None only in summaries written before the threshold was recorded.
    spike_threshold: Optional[float] = None
    spike_threshold_source: str = ""
    reward_mean: float = 0.0
    # vLLM's engine-wide preemption counter, summed over steps and workers; None: vLLM reported no
    # count (unknown, which is not 0).
    preemptions: Optional[float] = None
    weight_sync_max_diff: Optional[float] = None
    policy_change: Optional[float] = None
    # False: the probe never moved past the weight-sync tolerance, so every sync check compared vLLM with
    # weights it already had (names and reload path checked, new weights not); None: no check ran.
    weight_sync_exercised: Optional[bool] = None
    # Steps whose GRPO advantages were all 0 (every reward equal within each prompt's group): no update.
    zero_advantage_steps: int = 0
    # Why the run stopped: the engine's crash (status crash) or the failed weight-sync check (sync_mismatch).
    crash: Optional[CrashSignature] = None
    # The shift test of the run's |difference| distribution per condition (rollout_lab/shift.py); None:
    # not run (the run did not end ok, or its summary predates the test).
    shift: Optional[ShiftResult] = None
    engine_start_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0
    wandb_dir: Optional[str] = None
    environment: dict = field(default_factory=dict)


def write_summary(run_dir: Path, result: RunResult) -> Path:
    """<run_dir>/summary.json; the crash as CrashSignature.to_dict (with its key)."""
    path = Path(run_dir) / "summary.json"
    data = asdict(result) | {"crash": result.crash.to_dict() if result.crash is not None else None,
                             "shift": result.shift.to_dict() if result.shift is not None else None}
    path.write_text(json.dumps(data, indent=2))
    return path


def read_summary(run_dir: Path) -> RunResult:
    """<run_dir>/summary.json as a RunResult, run_dir where it was read; fields an older summary lacks
    take their defaults (run_id: the dir's name), and a key or value it cannot hold raises RecordsError."""
    path = Path(run_dir) / "summary.json"
    data = _read_json(path)
    known = {f.name for f in dataclasses.fields(RunResult)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RecordsError(f"{path} is not a rollout_lab summary: unknown key(s) {', '.join(unknown)}")
    if data.get("status", "interrupted") not in STATUSES:
        raise RecordsError(f"{path}: status {data['status']!r} is not one of {', '.join(STATUSES)}")
    threshold = data.get("spike_threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
        raise RecordsError(f"{path}: spike_threshold {threshold!r} is not a number")
    try:
        crash = CrashSignature.from_dict(data["crash"]) if data.get("crash") else None
    except (TypeError, ValueError) as exc:
        raise RecordsError(f"{path}: its crash is not a crash signature ({exc})".splitlines()[0]) from None

    try:
        shift = ShiftResult.from_dict(data["shift"]) if data.get("shift") else None
    except (TypeError, ValueError) as exc:
        raise RecordsError(f"{path}: its shift is not a shift test result ({exc})".splitlines()[0]) from None
    fields = {"run_id": Path(run_dir).name} | data | {"run_dir": str(run_dir), "crash": crash, "shift": shift}
    return RunResult(**fields)


def _read_json(path: Path) -> dict:
    """A JSON object from path; RecordsError names the file when it is missing, torn or not an object."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RecordsError(f"run dir {path.parent} has no {path.name}") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecordsError(f"{path} is corrupted ({exc})".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise RecordsError(f"{path} is corrupted (not a JSON object)")
    return data
