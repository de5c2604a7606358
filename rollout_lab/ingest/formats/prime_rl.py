"""prime-rl: token_exports/step_N/rank_R.jsonl (schema_version 1), one packed row a line.

A row packs one or more sequences; `position_ids` restart at 0 where a sequence starts. Per
token: `token_ids`, `loss_mask` (1 on generated tokens), `inference_logprobs` (sampler),
`trainer_logprobs`; `step`, `rank`, `run_id`. A step dir is read once its STABLE marker is there
(the trainer writes it when the step's export is complete); one without it is reported and skipped.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO, Iterator

from rollout_lab.ingest.formats.base import ExportFormat, number_in, require
from rollout_lab.ingest.sequence import ExportError, ExportedSequence, json_line

SCHEMA_VERSION = 1
STABLE = "STABLE"
FIELDS = ("token_ids", "position_ids", "loss_mask", "inference_logprobs", "trainer_logprobs")


def sequences_of_row(row: dict, where: str) -> list[ExportedSequence]:
    """The sequences packed into one exported row (pure: unit-tested)."""
    require(row, FIELDS, where)
    if row.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise ExportError(f"{where}: schema_version {row.get('schema_version')!r}, this rollout_lab reads {SCHEMA_VERSION}")
    lengths = {name: len(row[name]) for name in FIELDS}
    if len(set(lengths.values())) != 1:
        raise ExportError(f"{where}: per-token fields differ in length ({lengths})")
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] or [0]
    out = []
    for k, (start, end) in enumerate(zip(starts, starts[1:] + [len(row["token_ids"])])):
        mask = row["loss_mask"][start:end]
        generated = [i for i, m in enumerate(mask) if m]
        if not generated:
            continue  # a padding segment, or a sequence the trainer masked out whole
        first = generated[0]
        if generated != list(range(first, end - start)):
            raise ExportError(f"{where}: sequence {k}'s loss_mask is not one span (multi-turn samples are not read yet)")
        span = slice(start + first, end)
        out.append(ExportedSequence(
            step=int(row.get("step", 0)),
            prompt_token_ids=row["token_ids"][start : start + first],
            token_ids=row["token_ids"][span],
            sampler_logprobs=[float(x) for x in row["inference_logprobs"][span]],
            trainer_logprobs=[float(x) for x in row["trainer_logprobs"][span]],
            worker=int(row.get("rank", 0)),
        ).check(f"{where} sequence {k}"))
    return out


def _files(path: Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    root = path / "token_exports" if (path / "token_exports").is_dir() else path
    steps = sorted(root.glob("step_*"), key=lambda p: number_in(p, r"step_(\d+)"))
    if not steps:
        raise ExportError(f"{path} holds no prime-rl token_exports/step_N/ directory")
    unstable = [p.name for p in steps if not (p / STABLE).exists()]
    if unstable:
        print(f"rollout_lab.ingest: skipping {', '.join(unstable)} of {root}: no {STABLE} marker (export incomplete)")
    files = [f for p in steps if (p / STABLE).exists() for f in sorted(p.glob("rank_*.jsonl"), key=lambda f: number_in(f, r"rank_(\d+)"))]
    if not files:
        raise ExportError(f"{root} holds no complete step (step_N/rank_R.jsonl with a {STABLE} marker)")
    return files


def _sequences(file: BinaryIO, path: Path, tokenizer) -> Iterator[ExportedSequence]:
    for number, line in enumerate(io.TextIOWrapper(file, encoding="utf-8"), start=1):
        if line.strip():
            for k, seq in enumerate(sequences_of_row(json_line(line, path, number), f"{path}:{number}")):
                seq.request_id = f"{seq.worker}-{number}-{k}"
                yield seq


FORMAT = ExportFormat(
    name="prime-rl",
    reads="token_exports/step_N/rank_R.jsonl (schema_version 1, complete steps: STABLE marker): token_ids, position_ids, "
          "loss_mask, inference_logprobs (sampler), trainer_logprobs, step, rank",
    files=_files,
    sequences=_sequences,
)
