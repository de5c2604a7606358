"""What every export format is read into: one ExportedSequence per sampled completion, and the
generic schema (one JSONL object or Parquet row per completion) that writes and reads it.

The generic schema's fields are ExportedSequence's (docs/your_run.md#generic); `step`,
`prompt_token_ids` and `token_ids` are required, the rest may be absent or null. Logprob lists
hold one value per completion token: the logprob of that token, not of the next one.
"""
from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional

import pyarrow as pa

GENERIC_SCHEMA_VERSION = 1


class ExportError(ValueError):
    """An export file or record that cannot be read; the message names the file and the field."""


@dataclass
class ExportedSequence:
    """One sampled completion as a framework exported it."""

    step: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    # None: the export has no such side; the ingest computes the trainer's (teacher forcing).
    sampler_logprobs: Optional[list[float]] = None
    trainer_logprobs: Optional[list[float]] = None
    reward: Optional[float] = None
    # The data-parallel rank or sampler worker that produced it.
    worker: int = 0
    request_id: Optional[str] = None
    prompt_index: Optional[int] = None
    sample_index: Optional[int] = None
    # The engine's prefix-cache hit for the request (slime's prefix_cache_info.cached_tokens).
    num_cached_tokens: Optional[int] = None
    # The policy version the sampler's weights had (slime's weight_versions); lagging the step is stale.
    weight_version: Optional[int] = None
    seed: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    max_tokens: Optional[int] = None

    def check(self, where: str) -> "ExportedSequence":
        """Self, after checking the lists agree in length; ExportError names `where` and the field."""
        if not self.token_ids:
            raise ExportError(f"{where}: the completion has no tokens")
        for name in ("sampler_logprobs", "trainer_logprobs"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.token_ids):
                raise ExportError(f"{where}: {name} has {len(values)} values for {len(self.token_ids)} completion tokens")
        return self


FIELDS = {f.name: f for f in dataclasses.fields(ExportedSequence)}
REQUIRED = ("step", "prompt_token_ids", "token_ids")

GENERIC_PARQUET_SCHEMA = pa.schema(
    [
        ("step", pa.int32()),
        ("prompt_token_ids", pa.list_(pa.int32())),
        ("token_ids", pa.list_(pa.int32())),
        ("sampler_logprobs", pa.list_(pa.float64())),
        ("trainer_logprobs", pa.list_(pa.float64())),
        ("reward", pa.float64()),
        ("worker", pa.int32()),
        ("request_id", pa.string()),
        ("prompt_index", pa.int32()),
        ("sample_index", pa.int32()),
        ("num_cached_tokens", pa.int32()),
        ("weight_version", pa.int64()),
        ("seed", pa.int64()),
        ("temperature", pa.float64()),
        ("top_p", pa.float64()),
        ("top_k", pa.int32()),
        ("max_tokens", pa.int32()),
    ],
    metadata={"rollout_lab.generic_schema_version": str(GENERIC_SCHEMA_VERSION)},
)


def from_dict(row: dict[str, Any], where: str) -> ExportedSequence:
    """A generic-schema object as an ExportedSequence; ExportError names an unknown or missing field."""
    unknown = sorted(set(row) - set(FIELDS) - {"schema_version"})
    if unknown:
        raise ExportError(f"{where}: unknown field(s) {', '.join(unknown)}; the generic schema has {', '.join(FIELDS)}")
    missing = [name for name in REQUIRED if row.get(name) is None]
    if missing:
        raise ExportError(f"{where}: missing required field(s) {', '.join(missing)}")
    version = row.get("schema_version", GENERIC_SCHEMA_VERSION)
    if version != GENERIC_SCHEMA_VERSION:
        raise ExportError(f"{where}: schema_version {version!r}, this rollout_lab reads {GENERIC_SCHEMA_VERSION}")
    fields = {k: v for k, v in row.items() if k in FIELDS and v is not None}
    return ExportedSequence(**fields).check(where)


def to_dict(sequence: ExportedSequence) -> dict[str, Any]:
    """The generic-schema object of a sequence (nulls left out), with its schema_version."""
    return {"schema_version": GENERIC_SCHEMA_VERSION} | {k: v for k, v in dataclasses.asdict(sequence).items() if v is not None}


class GenericWriter:
    """Writes sequences in the generic schema: JSONL (one object a line) or Parquet (row groups of
    `rows_per_group`), by the path's suffix. Use as a context manager."""

    def __init__(self, path: Path, rows_per_group: int = 1024):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.parquet = self.path.suffix == ".parquet"
        self.rows_per_group, self.pending = rows_per_group, []
        self._file = None if self.parquet else self.path.open("w")
        self._writer = None

    def write(self, sequence: ExportedSequence) -> None:
        if not self.parquet:
            self._file.write(json.dumps(to_dict(sequence)) + "\n")
            return
        self.pending.append(dataclasses.asdict(sequence))
        if len(self.pending) >= self.rows_per_group:
            self._flush()

    def _flush(self) -> None:
        import pyarrow.parquet as pq

        if not self.pending:
            return
        table = pa.Table.from_pylist(self.pending, schema=GENERIC_PARQUET_SCHEMA)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, GENERIC_PARQUET_SCHEMA)
        self._writer.write_table(table)
        self.pending = []

    def close(self) -> None:
        if self.parquet:
            self._flush()
            if self._writer is not None:
                self._writer.close()
        else:
            self._file.close()

    def __enter__(self) -> "GenericWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_generic(file: BinaryIO, path: Path) -> Iterator[ExportedSequence]:
    """The sequences of a generic-schema file, streamed: JSONL line by line, Parquet row group by row group."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(file)
        except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
            raise ExportError(f"{path} is not a Parquet file: {exc}") from None
        for group in range(parquet.num_row_groups):
            for i, row in enumerate(parquet.read_row_group(group).to_pylist()):
                yield from_dict(row, f"{path} row group {group} row {i}")
        return
    for number, line in enumerate(io.TextIOWrapper(file, encoding="utf-8"), start=1):
        if line.strip():
            yield from_dict(json_line(line, path, number), f"{path}:{number}")


def json_line(line: str, path: Path, number: int) -> dict:
    """One JSONL line as an object; ExportError names the file and line when it is not one."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}:{number} is not JSON ({exc})") from None
    if not isinstance(row, dict):
        raise ExportError(f"{path}:{number} is not a JSON object")
    return row
