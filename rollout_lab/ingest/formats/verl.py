"""verl: the {rollout_data_dir}/{step}.jsonl files of trainer.rollout_data_dir, text and scores only.

Each line: `input` (the prompt as decoded text), `output` (the response text), `score`, `step`.
No token ids and no logprobs: both are recomputed, the ids by tokenizing the text with --model's
tokenizer (a decode/encode round trip that can differ from the ids that were sampled), the
trainer side by teacher forcing and the sampler side by an engine replay (--engine-config).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO, Iterator

from rollout_lab.ingest.formats.base import ExportFormat, glob_files, require
from rollout_lab.ingest.sequence import ExportError, ExportedSequence, json_line


def encode(tokenizer, text: str) -> list[int]:
    """Text as token ids, with no special tokens added: the exported text already holds its template."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def sequence(row: dict, step: int, number: int, tokenizer, where: str) -> ExportedSequence:
    require(row, ("input", "output"), where)
    score = row.get("score")
    return ExportedSequence(
        step=int(row.get("step", step)),
        prompt_token_ids=encode(tokenizer, row["input"]),
        token_ids=encode(tokenizer, row["output"]),
        reward=float(score) if isinstance(score, (int, float)) else None,
        request_id=str(number),
    ).check(where)


def _step(path: Path) -> int:
    try:
        return int(path.stem)
    except ValueError:
        raise ExportError(f"{path}: verl names its rollout files <step>.jsonl") from None


def _sequences(file: BinaryIO, path: Path, tokenizer) -> Iterator[ExportedSequence]:
    step = _step(path)
    for number, line in enumerate(io.TextIOWrapper(file, encoding="utf-8"), start=1):
        if line.strip():
            yield sequence(json_line(line, path, number), step, number, tokenizer, f"{path}:{number}")


FORMAT = ExportFormat(
    name="verl",
    reads="{rollout_data_dir}/{step}.jsonl: input, output (text), score, step; tokenized with --model's tokenizer, "
          "both logprob sides computed (the sampler's by replay: --engine-config)",
    files=lambda path: glob_files(path, "*.jsonl", "verl <step>.jsonl files", _step),
    sequences=_sequences,
    has_sampler_logprobs=False,
)
