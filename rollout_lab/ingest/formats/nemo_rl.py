"""NeMo-RL: the train_data_step{N}.jsonl files its GRPO loop logs, one sample a line, full sequences.

A line holds the whole sequence (`token_ids`, valid up to `input_lengths`) and per-token lists
aligned with it: `token_loss_mask` (1 on generated tokens), `generation_logprobs` (vLLM's),
`prev_logprobs` (the policy's before the update); `rewards`, `advantages`. The completion is the
span from the first masked token to the sequence's end; its unmasked tokens (tool output in a
multi-turn rollout) are not scored by the sampler and are left out of the token table by position.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO, Iterator

from rollout_lab.ingest.formats.base import ExportFormat, glob_files, number_in, require
from rollout_lab.ingest.sequence import ExportError, ExportedSequence, json_line

STEP = r"train_data_step(\d+)"


def _scalar(value):
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def sequence(row: dict, step: int, number: int, where: str) -> ExportedSequence:
    """One logged sample as an ExportedSequence (pure: unit-tested)."""
    require(row, ("token_ids", "input_lengths", "token_loss_mask", "generation_logprobs", "prev_logprobs"), where)
    length = int(_scalar(row["input_lengths"]))
    tokens, mask = row["token_ids"][:length], row["token_loss_mask"][:length]
    generated = [i for i, m in enumerate(mask) if m]
    if not generated:
        raise ExportError(f"{where}: token_loss_mask marks no generated token")
    start = generated[0]
    if generated != list(range(start, length)):
        raise ExportError(f"{where}: token_loss_mask is not one span from {start} to {length} (multi-turn samples are not read yet)")
    reward = _scalar(row.get("rewards"))
    return ExportedSequence(
        step=step,
        prompt_token_ids=tokens[:start],
        token_ids=tokens[start:],
        sampler_logprobs=[float(x) for x in row["generation_logprobs"][start:length]],
        trainer_logprobs=[float(x) for x in row["prev_logprobs"][start:length]],
        reward=float(reward) if reward is not None else None,
        request_id=str(row.get("idx", number)),
    ).check(where)


def _sequences(file: BinaryIO, path: Path, tokenizer) -> Iterator[ExportedSequence]:
    step = number_in(path, STEP)
    for number, line in enumerate(io.TextIOWrapper(file, encoding="utf-8"), start=1):
        if line.strip():
            yield sequence(json_line(line, path, number), step, number, f"{path}:{number}")


FORMAT = ExportFormat(
    name="nemo-rl",
    reads="train_data_step{N}.jsonl in the log dir: token_ids, input_lengths, token_loss_mask, generation_logprobs "
          "(sampler), prev_logprobs (trainer), rewards",
    files=lambda path: glob_files(path, "**/train_data_step*.jsonl", "NeMo-RL train_data_step*.jsonl", lambda p: number_in(p, STEP)),
    sequences=_sequences,
)
